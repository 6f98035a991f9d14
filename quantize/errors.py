"""Errors a user can fix: the command line prints them as one line, without a traceback."""


class QuantizeError(Exception):
    """Base class for every user-facing failure (bad input, bad config, invalid artifact)."""


class ConfigError(QuantizeError):
    """The configuration asks for something that does not exist or cannot work."""


class DataError(QuantizeError):
    """A dataset path, labels file or image is missing or unreadable."""


class ModelError(QuantizeError):
    """A model name, checkpoint or exported graph is unusable."""
