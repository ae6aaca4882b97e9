"""The one exception type meant for users."""


class PhituneError(Exception):
    """A problem the user can act on. The CLI prints its message on one line and exits with code 2."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (or its type), for quoting inside a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
