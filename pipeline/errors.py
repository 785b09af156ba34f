"""The pipeline's error types, in a module that imports nothing (decoder workers load it fast)."""


class ConfigError(ValueError):
    """A config that cannot run; raised before any work, with a message naming the problem."""


class RunError(RuntimeError):
    """A run stopped by a condition the user can fix (one `error:` line, exit code 1)."""
