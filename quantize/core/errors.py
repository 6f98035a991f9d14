"""Errors a user can fix: the command line prints them as one line, without a traceback."""


class QuantizeError(Exception):
    """Base class for every user-facing failure (bad input, bad config, invalid artifact)."""


class ConfigError(QuantizeError):
    """The configuration asks for something that does not exist or cannot work."""


class DataError(QuantizeError):
    """A dataset path, labels file or image is missing or unreadable."""


class ModelError(QuantizeError):
    """A model name, checkpoint or exported graph is unusable."""


def examples(items, limit: int = 5) -> str:
    """The first few offenders of a list, for a one-line message: ``a, b, c, ...``."""
    items = list(items)
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def one_line(text: object, limit: int = 300) -> str:
    """Any exception text folded onto one line and cut to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
