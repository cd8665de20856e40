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


class MissingExtra(HcxError, ImportError):
    """An optional dependency is not installed; the message names the extra that
    installs it (``pip install 'hcx[eval]'``)."""


def require(module: str, extra: str, *, package: str | None = None, purpose: str = ""):
    """Import ``module``, which hcx installs only with its optional-dependency group
    ``extra`` (pyproject.toml), or raise :class:`MissingExtra` saying how to install it.
    ``package``: the distribution's name where it differs from the module's (lm-eval);
    ``purpose``: what needs it, for the message."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        needs = f"{purpose} needs" if purpose else "this needs"
        raise MissingExtra(
            f"{needs} {package or module}, an optional dependency of hcx: install the "
            f"'{extra}' extra with pip install 'hcx[{extra}]' (in a checkout: pip install -e "
            f"'.[{extra}]'); importing {module} failed: {e}") from e
