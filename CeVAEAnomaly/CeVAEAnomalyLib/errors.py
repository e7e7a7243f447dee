"""The one exception type for problems a user can act on."""


class CeVAEError(Exception):
    """A user-facing problem: the message says what is wrong and what to do.

    The command line prints it as one line (no traceback unless ``--debug``); the Slicer
    module shows it in an error dialog.
    """
