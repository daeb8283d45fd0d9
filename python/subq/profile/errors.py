"""The one exception the CLI turns into a one-line message and exit status 2."""


class ProfileError(Exception):
    """A bad request (unknown op, dtype the device cannot run, size that does not fit): no traceback, one line."""
