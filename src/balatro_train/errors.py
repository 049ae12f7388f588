"""The one exception for mistakes a user can fix: printed as one line, no traceback."""


class UserError(Exception):
    """A problem with the user's data, config or files; the message names it and says what to do."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run at a step boundary, after saving last.pt; the message says
    how to resume."""
