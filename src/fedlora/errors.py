"""The one-line error type of the command line, in a module that imports nothing heavy, so
`fedlora --help` and the CLI's error handling never pull in torch."""


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""
