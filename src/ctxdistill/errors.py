"""The one error type users see: a message that names the problem and the fix."""


class CtxDistillError(Exception):
    """Bad input or environment. The CLI prints it as one line and exits with code 2."""


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT during training: a checkpoint was written. The CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = int(signum)
