"""Errors a user can fix by changing a config value or an environment; entry points print them on one line."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and what is allowed."""


class DataUnavailableError(RuntimeError):
    """A corpus, tokenizer or model could not be found locally or fetched; the message says what to do."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to one line (its type when it has none), for one-line errors that wrap it."""
    message = str(error)
    return message.splitlines()[0] if message else type(error).__name__
