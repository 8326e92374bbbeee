"""The one error type the tool raises for problems a user can fix."""


class HUDDError(Exception):
    """A problem with the user's input: the message names the file and what to do.

    The command line prints it as one line and exits with status 2; nothing already
    written to the case folder is touched.
    """
