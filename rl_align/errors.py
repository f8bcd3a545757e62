"""The one exception type for mistakes a user can fix (bad preset, bad value, unknown name)."""


class UserError(Exception):
    """A problem in what the user asked for. The CLI prints its message on one line and exits 2."""
