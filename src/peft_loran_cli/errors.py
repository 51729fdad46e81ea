"""Errors the command line reports as one line (no traceback) with a non-zero exit code."""


class UserError(Exception):
    """A problem with what the user asked for (a path, a field, a number): reported as ``error: <message>``."""
