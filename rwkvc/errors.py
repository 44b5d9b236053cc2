"""User-facing errors."""


class RwkvcError(Exception):
    """A user-facing error: one line, naming the problem and what to do."""
