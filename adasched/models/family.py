"""Load the denoisers of a family and check that they can stand in for one another."""

from __future__ import annotations

from pathlib import Path

from adasched.errors import ConfigError, DataUnavailableError
from adasched.models.dit import MDLMDenoiser

SHARED_FIELDS = ("vocab_size", "mask_token_id", "seq_len")


def load_denoiser(path: str | Path) -> MDLMDenoiser:
    """A denoiser saved by ``save_pretrained``, in float32 and eval mode."""
    if not (Path(path) / "config.json").is_file():
        raise DataUnavailableError(f"no denoiser at {path}: expected config.json and model.safetensors there")
    return MDLMDenoiser.from_pretrained(str(path)).float().eval()


def check_family(members: dict[str, MDLMDenoiser]) -> None:
    """Refuse members whose vocabulary, mask id or sequence length differ: their outputs could not be swapped."""
    if not members:
        raise ConfigError("a model family needs at least one member")
    (first_name, first), *rest = members.items()
    for name, model in rest:
        for field in SHARED_FIELDS:
            mine, theirs = getattr(model.config, field), getattr(first.config, field)
            if mine != theirs:
                raise ConfigError(
                    f"family member {name!r} has {field}={mine} but {first_name!r} has {field}={theirs}; "
                    "all members must share vocabulary, mask id and sequence length"
                )


def load_family(paths: dict[str, str | Path]) -> dict[str, MDLMDenoiser]:
    """Load every member (name -> folder) and check they form a family."""
    members = {name: load_denoiser(path) for name, path in paths.items()}
    check_family(members)
    return members
