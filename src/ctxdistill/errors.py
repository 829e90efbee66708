"""The one error type users see: a message that names the problem and the fix."""


class CtxDistillError(Exception):
    """Bad input or environment. The CLI prints it as one line and exits with code 2."""
