"""adasched: choose which masked-diffusion denoiser runs at every sampling step."""

from adasched.errors import ConfigError, DataUnavailableError

__all__ = ["ConfigError", "DataUnavailableError"]
__version__ = "0.1.0"
