"""One run per run folder: the launching process holds an exclusive lock on `<run_dir>/.lock`, taken
before anything is written, so that a second run started into the same folder stops with one line
instead of interleaving its checkpoints and metrics with the first; a folder that cannot be written
is named at start-up the same way.

Only the launching process locks: the processes a launcher starts for the other ranks (Lightning's
ddp sets LOCAL_RANK, torchrun RANK, SLURM SLURM_PROCID) write into the folder of the run that
holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import sys
import time
from pathlib import Path

from selfflow.io.safe_files import UnsafeFileError, open_no_follow

log = logging.getLogger("selfflow")

LOCK_NAME = ".lock"
RANK_VARIABLES = ("LOCAL_RANK", "RANK", "SLURM_PROCID")
_held: dict[Path, int] = {}  # run folders this process has locked -> the lock file's descriptor


class RunFolderError(RuntimeError):
    """The run folder is in use by another run, or cannot be written."""


def _forget_locks_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies: the lock stays the parent's and ends
    with it."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def launching_process() -> bool:
    """False in the processes a launcher started for ranks other than 0."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def check_writable(folder: Path) -> None:
    """RunFolderError unless `folder` (or, where it does not exist yet, its nearest existing parent)
    is writable."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(
            f"run folder {folder} cannot be made: {existing} is not a folder; "
            f"choose another hydra.run.dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(
            f"run folder {folder} is not writable ({existing} is read-only for this user); choose "
            f"a writable hydra.run.dir, or fix the folder's permissions"
        )


def check_no_planted_links(folder: Path, depth: int = 2, most: int = 100_000) -> None:
    """RunFolderError naming the first symbolic link to a file (or to nothing) in `folder` and its
    sub-folders down to `depth`: Lightning, Hydra and the loggers open their files (metrics.csv,
    hparams.yaml, .hydra/...) by name and would write through it. A link to a folder (checkpoints/
    on another disk) is kept."""
    pending, seen = [(folder, depth)], 0
    while pending:
        current, left = pending.pop()
        with contextlib.suppress(OSError), os.scandir(current) as entries:
            for entry in entries:
                seen += 1
                if seen > most:
                    return
                if entry.is_symlink() and not entry.is_dir():
                    raise RunFolderError(
                        f"run folder {folder} holds a symbolic link {entry.path} to a file; "
                        f"selfflow writes no file through a link in a run folder: remove it, "
                        f"or choose another hydra.run.dir"
                    )
                if left > 1 and entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), left - 1))


def lock_run_folder(run_dir: str | os.PathLike) -> bool:
    """Lock `run_dir` for this process: True when taken now, False when this process already
    held it.

    RunFolderError (one line naming the folder and the other process) when another process holds it,
    or when the folder cannot be written."""
    folder = Path(run_dir).expanduser().resolve()
    if folder in _held:
        return False
    for part in (folder, folder / "checkpoints"):
        check_writable(part)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a planted link is refused, never written through
        fd = open_no_follow(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    except UnsafeFileError as error:
        raise RunFolderError(f"cannot lock run folder {folder}: {error}") from None
    except OSError as error:
        raise RunFolderError(
            f"cannot write into run folder {folder}: {error.strerror or error}; "
            f"choose a writable hydra.run.dir"
        ) from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderError(
            f"run folder {folder} is in use by another run ({holder}); wait for it to end, or "
            f"start this run in another folder (hydra.run.dir=...)"
        ) from None
    except OSError as error:  # a filesystem without locks (some network mounts): run, but say so
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        log.warning(
            "cannot lock run folder %s (%s); make sure no other run writes into it",
            folder,
            error.strerror,
        )
    holder = (
        f"pid {os.getpid()} on {socket.gethostname()}, started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:300]}"
    )
    try:
        check_no_planted_links(folder)
    except RunFolderError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode() + b"\n", 0)
    _held[folder] = fd
    return True


def release_run_folder(run_dir: str | os.PathLike) -> None:
    fd = _held.pop(Path(run_dir).expanduser().resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor ends the lock


@contextlib.contextmanager
def run_folder_lock(run_dir: str | os.PathLike):
    """Hold the run folder's lock for the block (launching process only); a lock this process took
    earlier (the command line takes it before Hydra writes its files) is kept after the block."""
    taken = launching_process() and lock_run_folder(run_dir)
    try:
        yield
    finally:
        if taken:
            release_run_folder(run_dir)


# what Hydra and the lock put into a run folder before the run starts: a run that stops at start-up
# leaves only these
START_UP_FILES = {
    "train.log",
    LOCK_NAME,
    ".hydra/config.yaml",
    ".hydra/hydra.yaml",
    ".hydra/overrides.yaml",
}


def remove_if_unused(run_dir: str | os.PathLike) -> bool:
    """Remove `run_dir` when it holds nothing but the files written at start-up (a run that stopped
    at start-up leaves no empty run folder behind); a folder with anything else in it, or with
    links, is left as it is. Returns whether it was removed."""
    folder = Path(run_dir)
    if folder.is_symlink() or not folder.is_dir():
        return False
    entries = list(folder.rglob("*"))
    files = {str(p.relative_to(folder)) for p in entries if p.is_file() and not p.is_symlink()}
    folders = {p for p in entries if p.is_dir() and not p.is_symlink()}
    if (
        len(files) + len(folders) != len(entries)
        or not files <= START_UP_FILES
        or folders - {folder / ".hydra"}
    ):
        return False
    for name in files:
        (folder / name).unlink()
    for sub in (folder / ".hydra", folder):
        with contextlib.suppress(FileNotFoundError):
            sub.rmdir()
    return True
