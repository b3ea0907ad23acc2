"""The one exception type for user mistakes: the CLI prints its message as a single line."""


class HpreditError(Exception):
    """A problem the user can fix (bad input, mismatched artifact, missing file).

    Its message says what is wrong and what to do; the CLI shows it without a traceback.
    """
