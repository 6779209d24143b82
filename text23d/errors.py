"""User-facing errors: each message names the bad value, what is allowed, and the fix."""


class Text23dError(Exception):
    """An error caused by the user's input or environment, shown without a traceback."""


class ConfigError(Text23dError):
    """A configuration value is out of range, unknown or inconsistent."""


class PriorLoadError(Text23dError):
    """The diffusion prior (model id or folder) could not be loaded."""


class CheckpointError(Text23dError):
    """A checkpoint to resume or export from is missing or unreadable."""


class RunStopped(Text23dError):
    """The run stopped with its state saved; `exit_code` is what the command returns."""
    exit_code = 1


class DiskFull(RunStopped):
    """A write failed for lack of space; the previous file is intact (fileio.disk_full)."""
    exit_code = 5
