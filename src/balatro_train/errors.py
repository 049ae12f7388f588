"""The one exception for mistakes a user can fix (printed as one line, no traceback), and the stop of
an interrupted run."""

import functools
import logging
import sys


class UserError(Exception):
    """A problem with the user's data, config or files; the message names it and says what to do."""


class UnknownCallable(UserError):
    """A config names a `_target_` that balatro-train does not build (model, head or metric): `key` says
    where, `target` what. A checkpoint's config is data: what it names is looked up, never imported."""

    def __init__(self, key: str, target, allowed: list[str]):
        super().__init__(f"{key}._target_={target} is not one balatro-train builds (it builds: {', '.join(allowed)})")
        self.key, self.target = key, target


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run at a step boundary, after saving last.pt; the message says
    how to resume."""


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError that caused `error`, if any: hydra.utils.instantiate wraps what a `_target_`
    raises (an unknown backbone, a bad render setting) in its own InstantiationException."""
    while error is not None and not isinstance(error, UserError):
        error = error.__cause__
    return error


def exit_on_user_error(cli):
    """For a command-line tool's main: a UserError becomes its one-line message on stderr and exit
    code 2, never a traceback."""

    @functools.wraps(cli)
    def run(*args, **kwargs):
        try:
            return cli(*args, **kwargs)
        except Exception as e:
            if user_error_in(e) is None:
                raise
            logging.getLogger("balatro_train").error("%s", user_error_in(e))
            sys.exit(2)

    return run
