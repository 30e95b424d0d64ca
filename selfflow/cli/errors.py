"""Turn the errors a user can cause into one clear line and a non-zero exit, instead of a deep traceback."""
from __future__ import annotations

import contextlib
import os
import sys

from omegaconf.errors import OmegaConfBaseException

from selfflow.data.bad_files import BadFileError

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, KeyError, BadFileError, OmegaConfBaseException)


def root_cause(error: BaseException) -> BaseException:
    """Hydra's instantiate wraps the real error; the innermost user error is the one worth showing."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


@contextlib.contextmanager
def friendly_errors(command: str):
    """Exit with status 2 and `command: error: message` for user errors; SELFFLOW_TRACEBACK=1 shows the traceback."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - classified below
        cause = root_cause(error)
        if os.environ.get("SELFFLOW_TRACEBACK") or not isinstance(cause, USER_ERRORS):
            raise
        message = str(cause).strip().strip('"') or type(cause).__name__
        print(f"{command}: error: {message}", file=sys.stderr)
        print(f"{command}: (set SELFFLOW_TRACEBACK=1 to see the full traceback)", file=sys.stderr)
        raise SystemExit(2) from None
