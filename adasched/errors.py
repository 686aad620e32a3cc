"""Errors a user can fix by changing a config value or an environment; entry points print them on one line."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and what is allowed."""


class DataUnavailableError(RuntimeError):
    """A corpus, tokenizer or model could not be found locally or fetched; the message says what to do."""
