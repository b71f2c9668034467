"""The exceptions that reach the user as one line instead of a traceback (see ucad.cli.one_line_errors)."""


class UcadError(Exception):
    """A problem the user can fix (bad path, unknown option value, missing file): the message names the offending
    path or option and says how to fix it. Exit status 2."""


class RunInterrupted(Exception):
    """Ctrl-C during a run: the message says what was kept and how to continue. Exit status 130."""
