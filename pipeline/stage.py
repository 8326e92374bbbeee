"""Errors of a run: the user's input passes as HUDDError, anything else becomes an InternalError with
its traceback in CASE/T/error.log."""
from common.errors import HUDDError, InternalError, log_internal_error


class stage:
    """`with stage(case_dir, name) as where:` turns an unexpected exception into an InternalError.

    Its traceback goes to CASE/T/error.log; a HUDDError (the user's input) passes unchanged. Set
    `where.name` as the work moves on, so the message names the step that failed.
    """

    def __init__(self, case_dir, name):
        self.case_dir, self.name = case_dir, name

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if exc is None or isinstance(exc, (HUDDError, InternalError)) or not isinstance(exc, Exception):
            return False
        raise log_internal_error(self.case_dir, self.name, exc) from exc
