"""Error types. Every user-facing failure is a MoGUError so the CLI can print one line."""


class MoGUError(Exception):
    """Base class for errors caused by user input (files, models, options)."""


class ConfigError(MoGUError, ValueError):
    """A configuration value is missing or out of range."""


class UnknownFamilyError(MoGUError):
    """The base model's architecture is not registered and no target modules were given."""


class CheckpointMismatchError(MoGUError):
    """A saved MoGU checkpoint does not fit the base model it is loaded onto."""


class DataError(MoGUError):
    """A data file is missing, malformed or empty."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
