"""The one exception type meant for users."""


class PhituneError(Exception):
    """A problem the user can act on. The CLI prints its message on one line and exits with code 2."""
