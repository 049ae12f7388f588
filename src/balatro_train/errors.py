"""The one exception for mistakes a user can fix (printed as one line, no traceback), and the stop of
an interrupted run."""

import functools
import logging
import sys


class UserError(Exception):
    """A problem with the user's data, config or files; the message names it and says what to do."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run at a step boundary, after saving last.pt; the message says
    how to resume."""


def exit_on_user_error(cli):
    """For a command-line tool's main: a UserError becomes its one-line message on stderr and exit
    code 2, never a traceback."""

    @functools.wraps(cli)
    def run(*args, **kwargs):
        try:
            return cli(*args, **kwargs)
        except UserError as e:
            logging.getLogger("balatro_train").error("%s", e)
            sys.exit(2)

    return run
