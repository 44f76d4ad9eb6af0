"""``ConfigError``: bad input (config, data, checkpoint), which the command-line tools report in one line, exit 2.

A module of its own, importing nothing, so that every module that refuses bad input (the config, the data loader,
checkpoints, the run directory, the command lines) raises the same error without importing any of the others.
"""


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it and how to fix it."""
