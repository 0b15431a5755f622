"""The one exception type for user mistakes: the CLI prints it as a single line, no traceback."""


class EdgelrError(Exception):
    """A problem with the user's input (a file, a flag, a model) that they can fix.

    The message says what is wrong, where, and what to do about it.
    """
