"""The one error type the tool raises for problems a user can fix."""


class HUDDError(Exception):
    """A problem with the user's input: the message names the file and what to do.

    The command line prints it as one line and exits with status 2; nothing already
    written to the case folder is touched.
    """


class InternalError(Exception):
    """An unexpected exception inside a step: a bug of the tool, not of the user's input.

    The command line prints it as one line and exits with status 1; the traceback is kept in
    `log` (T/error.log) for the bug report, and every finished step's outputs stay as they were.
    """

    def __init__(self, step, exc, log):
        self.step, self.log = step, log
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        super().__init__(f"internal error in step {step}: {type(exc).__name__}{': ' + detail if detail else ''}; "
                         f"the traceback is in {log}, please report it")


def log_internal_error(case_dir, step, exc):
    """Append the traceback of `exc` to CASE/T/error.log (atomically) and return the InternalError to raise.

    When T/ cannot be written, the log goes to the system's temporary folder instead, so the user
    always gets a file to attach to the report.
    """
    import platform
    import sys
    import tempfile
    import time
    import traceback
    from pathlib import Path

    from common.files import write_text

    entry = (f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} step {step}\n"
             f"command: {' '.join(sys.argv)}\n"
             f"python {platform.python_version()} on {platform.platform()}\n"
             + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + "\n")
    places = [Path(case_dir) / "T" / "error.log"] if Path(case_dir).is_dir() else []
    for log in places + [Path(tempfile.gettempdir()) / "hudd-error.log"]:
        try:
            old = log.read_text(encoding="utf-8") if log.is_file() else ""
            write_text(log, old + entry)
            return InternalError(step, exc, log)
        except OSError:
            continue
    return InternalError(step, exc, "(not written: no writable folder)")
