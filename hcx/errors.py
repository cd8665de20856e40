"""User-facing errors. The CLI prints their message (no traceback) and exits non-zero;
each names what is at fault: the recipe key and file, the data file and line, the
checkpoint, or the step."""


class HcxError(Exception):
    """Base of every error hcx reports to users as a message."""


class MachineError(HcxError, RuntimeError):
    """The processes or the machine do not match the recipe (world size, Transformer Engine)."""


class Stopped(BaseException):
    """SIGTERM/SIGINT arrived and the command stopped cleanly (training saved a
    checkpoint of its last finished step; data preparation removed its partial files).
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the
    way (a library wrapper, an error-naming handler) can swallow it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
