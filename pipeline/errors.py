"""``ConfigError``: bad input (config, data, checkpoint), which the command-line tools report in one line, exit 2.

A module of its own because ``pipeline.config`` imports ``pipeline.data`` (the embedded data set is the default
``data.dataset``) and the data loader raises this error too.
"""


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it and how to fix it."""
