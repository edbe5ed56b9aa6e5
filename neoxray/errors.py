"""The one exception type that the CLI turns into a one-line error (no traceback)."""


class NeoxrayError(Exception):
    """A user-facing error: bad input, a missing file, a wrong config. The message names the input."""
