"""The one exception type that reaches the user as a plain message instead of a traceback."""


class UcadError(Exception):
    """A problem the user can fix (bad path, unknown option value, missing file).

    The message must name the offending path or option and say how to fix it;
    the command line prints it as one line and exits with status 2.
    """


class RunInterrupted(Exception):
    """Ctrl-C during a run. The message says what was kept and how to continue; the command line prints it as
    one line and exits with status 130, as shells do for an interrupted program."""
