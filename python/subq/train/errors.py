"""The one exception the training CLI turns into a one-line message and exit status 2."""


class TrainError(ValueError):
    """A bad request (unknown model, bad override, sizes the corpus cannot fill): no traceback, one line. A
    ValueError, so code calling the pieces directly can catch bad values the usual way."""
