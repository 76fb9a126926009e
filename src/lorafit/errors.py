"""Every public error type, one per boundary, each mapped to an exit code by the CLI.

``ConfigError``, ``AdapterError`` and ``DataError`` are ``ValueError``s: bad input that names the field, file or
line and what to do (exit 2, nothing written). ``TrainingError`` is a run that cannot go on (exit 1).
"""


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field, the value and what is allowed."""


class AdapterError(ValueError):
    """A broken or mismatched adapter folder; the message names the file or key and what is wrong."""


class DataError(ValueError):
    """A data file, model folder or output folder that cannot be used; the message names it and says why."""


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, a broken checkpoint); the message says what is kept."""


class MissingExtraError(ConfigError):
    """An optional dependency a command needs is not installed; the message names the extra to install."""
