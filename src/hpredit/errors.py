"""The one exception type for user mistakes: the CLI prints its message as a single line."""


class HpreditError(Exception):
    """A problem the user can fix (bad input, mismatched artifact, missing file).

    Its message says what is wrong and what to do; the CLI shows it without a traceback.
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): what a
    one-line ``error:`` shows of a failure from another library."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
