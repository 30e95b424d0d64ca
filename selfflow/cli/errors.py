"""Turn the errors a user can cause into one clear line and a non-zero exit, instead of a
deep traceback."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
from typing import NoReturn

from omegaconf.errors import OmegaConfBaseException

from selfflow.dependencies import explain_import_failure
from selfflow.io.bad_files import BadFileError
from selfflow.io.safe_files import UnsafeFileError
from selfflow.training.checkpoint_io import CheckpointWriteError
from selfflow.training.nonfinite import NonFiniteLossError
from selfflow.training.run_folder import RunFolderError

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    KeyError,
    BadFileError,
    OmegaConfBaseException,
    ModuleNotFoundError,
    CheckpointWriteError,
    NonFiniteLossError,
    RunFolderError,
    UnsafeFileError,
)


def root_cause(error: BaseException) -> BaseException:
    """Hydra's instantiate wraps the real error: the outermost user error of the chain is the one
    worth showing (a user error raised `from` a library error explains it better than the library
    error does)."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    return next((e for e in chain if isinstance(e, USER_ERRORS)), chain[-1])


@contextlib.contextmanager
def friendly_errors(command: str):
    """Exit with status 2 and `command: error: message` for user errors; SELFFLOW_TRACEBACK=1 shows
    the traceback."""
    try:
        yield
    except Exception as error:
        cause = root_cause(error)
        broken_dependency = explain_import_failure(error)
        if os.environ.get("SELFFLOW_TRACEBACK") or not (
            broken_dependency or isinstance(cause, USER_ERRORS)
        ):
            raise
        message = broken_dependency or str(cause).strip().strip('"') or type(cause).__name__
        print(f"{command}: error: {message}", file=sys.stderr)
        print(f"{command}: (set SELFFLOW_TRACEBACK=1 to see the full traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def _keys_near(config_name: str, overrides: list[str], full_key: str) -> str:
    """'did you mean ...?' and the keys that exist next to an unknown `full_key`."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    parent, _, name = full_key.rpartition(".")
    usable = [o for o in overrides if not o.lstrip("+~").startswith(full_key)]
    try:
        with initialize_config_module("selfflow.conf", version_base="1.3"):
            node = (
                OmegaConf.select(compose(config_name, overrides=usable), parent) if parent else None
            )
    except Exception:
        return ""
    if node is None and parent:
        return ""
    if node is None:
        with initialize_config_module("selfflow.conf", version_base="1.3"):
            node = compose(config_name, overrides=usable)
    keys = sorted(str(k) for k in node if k != "hydra") if hasattr(node, "keys") else []
    near = difflib.get_close_matches(name, keys, n=1)
    hint = f"did you mean {parent + '.' if parent else ''}{near[0]}? " if near else ""
    return f"{hint}keys{' of ' + parent if parent else ''}: {', '.join(keys)}"


def describe_override_error(error: Exception, config_name: str, overrides: list[str]) -> str | None:
    """One line for a command-line override Hydra cannot apply (unknown key, unknown option,
    bad syntax)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(error, MissingConfigException) and error.options is not None:
        group = error.missing_cfg_file.rpartition("/")[0]
        option = error.missing_cfg_file.rpartition("/")[2]
        return (
            f"{group}={option} is not an option; choose one of: {', '.join(sorted(error.options))}"
        )
    if isinstance(error, OverrideParseException):
        return f"cannot parse the override {error.override!r}: {error.message.splitlines()[0]}"
    full_key = getattr(error.__cause__, "full_key", None)
    if full_key:
        return (
            f"{full_key} is not a config key (typo?); "
            f"{_keys_near(config_name, overrides, full_key)}"
        ).rstrip("; ")
    deleted = re.search(r"'([^']+)' does not exist", str(error))
    if deleted:
        return f"cannot delete {deleted[1]}: it is not in the config"
    return None


def fail(command: str, message: str) -> NoReturn:
    """`command: error: message` on stderr and exit status 2."""
    print(f"{command}: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def check_overrides(command: str, config_name: str, args: list[str]):
    """Compose the config once before Hydra does, so that a bad override ends in one line and exit
    status 2 (Hydra's own report spans several lines). Flags (--help, -m, ...) and hydra.*
    overrides are left to Hydra. Returns the composed (unresolved) config, or None where it was
    left to Hydra."""
    if any(a.startswith("-") for a in args):
        return None
    overrides = [a for a in args if not a.lstrip("+~").startswith("hydra")]
    from hydra import compose, initialize_config_module

    try:
        with initialize_config_module("selfflow.conf", version_base="1.3"):
            return compose(config_name, overrides=overrides)
    except Exception as error:
        if os.environ.get("SELFFLOW_TRACEBACK"):
            return None
        message = describe_override_error(error, config_name, overrides)
        if message is None:
            return None
        fail(command, message)
