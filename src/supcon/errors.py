"""Errors that the command line reports as one line on stderr with exit code 2."""


class UsageError(Exception):
    """Bad input from the user: a path, an option, a file. The message names the problem."""
