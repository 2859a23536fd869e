"""The one exception a config problem raises."""


class ConfigError(ValueError):
    """A config problem a person can fix; the CLI prints it without a traceback (exit status 2)."""
