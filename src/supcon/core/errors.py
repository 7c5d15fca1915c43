"""Errors that the command line reports as one line on stderr with exit code 2."""


class UsageError(ValueError):
    """Bad input from the user: a path, an option, a file. The message names the problem.

    A ``ValueError``, so library callers can catch it as the bad value it is.
    """
