"""User-facing errors: each message names the bad value, what is allowed, and the fix."""


class Text23dError(Exception):
    """An error caused by the user's input or environment, shown without a traceback."""


class ConfigError(Text23dError):
    """A configuration value is out of range, unknown or inconsistent."""


class PriorLoadError(Text23dError):
    """The diffusion prior (model id or folder) could not be loaded."""


class CheckpointError(Text23dError):
    """A checkpoint to resume or export from is missing or unreadable."""
