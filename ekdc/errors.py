"""User-facing errors: one clear line, exit code 2, never a traceback."""


class UserError(Exception):
    """A problem with the user's input (recipe, file, flag, environment).

    The CLI prints ``str(err)`` on one line and exits with code 2. Anything else that escapes is a bug
    and exits with code 1.
    """

    exit_code = 2
