"""A cache of generated data sets, outside the repository, keyed by their generation parameters."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfflow.io.safe_files import write_bytes_atomically

log = logging.getLogger("selfflow.data")

DEFAULT_CACHE = "~/.cache/selfflow"
MARKER = "parameters.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $SELFFLOW_CACHE, else ~/.cache/selfflow."""
    return Path(cache_dir or os.environ.get("SELFFLOW_CACHE") or DEFAULT_CACHE).expanduser()


def cached_folder(
    name: str,
    parameters: dict[str, Any],
    build: Callable[[Path], None],
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """`<cache>/<name>/<hash of parameters>`, made by `build(folder)` the first time only.

    Changed parameters give another folder, so a stale set is never reused. The folder is built
    under a temporary name and renamed when complete, so an interrupted or concurrent build never
    leaves half a set.
    """
    text = json.dumps(parameters, sort_keys=True)
    folder = cache_root(cache_dir) / name / hashlib.sha1(text.encode()).hexdigest()[:12]
    if (folder / MARKER).is_file():
        return folder
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log.info("generating %s into %s (once; later runs reuse it)", name, folder)
    try:
        build(partial)
        write_bytes_atomically(partial / MARKER, (text + "\n").encode())
        partial.rename(folder)
    except OSError:
        if not (folder / MARKER).is_file():  # not a concurrent build that finished first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder
