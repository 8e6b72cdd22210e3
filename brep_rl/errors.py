"""Errors a user can fix: the command line shows them as one line with no traceback. Anything else is a bug and
keeps its traceback."""


class UserError(Exception):
    """A problem with what the user asked for or handed in; the message names the flag, file, row or field."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


class DataError(UserError, ValueError):
    """A task, file or row cannot be used; the message names the file, line and field."""


class ArtifactError(UserError, ValueError):
    """A saved steering artifact is missing, corrupt, or does not fit the model."""


class BackendUnavailable(UserError, RuntimeError):
    """The rollout backend asked for cannot serve this model or these vectors."""
