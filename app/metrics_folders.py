"""The folders in which `voucher-ledger serve --workers N` keeps its workers' metrics (prometheus_client's
multiprocess mode), and the removal of those a killed service left behind.

`serve` makes one folder per start in the temp folder (`voucher-ledger-metrics-*`) and removes it on its
way out, which `kill -9` skips; so every start first removes the folders that no live process uses
(`remove_stale`). A folder is in use while some process holds a shared `flock` on its lock file: `serve`
takes one when it makes the folder (`make`), each worker another when it starts (`hold`, from
`app.metrics`), and the kernel lets go of them when a process ends, however it ends. A folder whose lock
can be taken exclusively has no live user: it is removed under that lock. A folder without a lock file was
made before there was one (or is being made this instant): it is removed only when it is older than
`UNLOCKED_GRACE_S` and no live process has it as its `PROMETHEUS_MULTIPROC_DIR` (`/proc`); when that
cannot be seen, it is kept. Nothing else in the temp folder is touched, nor another user's folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

__all__ = ["LOCK_NAME", "PREFIX", "UNLOCKED_GRACE_S", "hold", "hold_from_environment", "make", "remove_stale"]

log = logging.getLogger(__name__)

PREFIX = "voucher-ledger-metrics-"
LOCK_NAME = ".in-use.lock"  # prometheus_client reads `*.db` files only
# a folder without a lock is left alone this long: a `serve` of the version before the lock makes one and
# starts its workers, which name it in their environment, within a few seconds
UNLOCKED_GRACE_S = 120.0
_ENV = "PROMETHEUS_MULTIPROC_DIR"

# lock files this process holds, open for its lifetime: closing one would let go of the folder
_held: list[int] = []


def make(parent: Path | None = None) -> Path:
    """A new metrics folder in `parent` (the temp folder), held by this process until it ends."""
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    hold(folder)
    return folder


def hold(folder: Path | str) -> None:
    """Hold `folder` in use for the rest of this process's life: a shared lock on its lock file (made when
    missing). Idempotent enough: a second hold is a second shared lock, let go of with the process too."""
    fd = os.open(Path(folder) / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _held.append(fd)


def hold_from_environment() -> None:
    """In a worker of `serve`: hold the folder `PROMETHEUS_MULTIPROC_DIR` names, if `serve` made it."""
    folder = os.environ.get(_ENV)
    if folder and Path(folder).name.startswith(PREFIX) and (Path(folder) / LOCK_NAME).exists():
        with contextlib.suppress(OSError):  # metrics are not worth failing a worker's start for
            hold(folder)


def remove_stale(parent: Path | None = None, *, now: float | None = None) -> list[Path]:
    """Remove the metrics folders in `parent` (the temp folder) that no live process uses; returns them."""
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        candidates = sorted(parent.glob(f"{PREFIX}*"))
    except OSError:
        return removed
    in_environments: set[str] | None = None
    for folder in candidates:
        try:
            info = folder.lstat()
        except OSError:
            continue
        if not folder.is_dir() or folder.is_symlink() or info.st_uid != os.getuid():
            continue
        lock = folder / LOCK_NAME
        if lock.exists():
            if _remove_if_unlocked(folder, lock):
                removed.append(folder)
            continue
        if now - info.st_mtime < UNLOCKED_GRACE_S:
            continue
        if in_environments is None:
            in_environments = _folders_in_environments()
        if str(folder) in in_environments or "*" in in_environments:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info("removed %d metrics folder(s) left by services that are gone", len(removed))
    return removed


def _remove_if_unlocked(folder: Path, lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live service uses it
            return False
        shutil.rmtree(folder, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def _folders_in_environments() -> set[str]:
    """`PROMETHEUS_MULTIPROC_DIR` of every live process of this user that can be read; `{"*"}` when /proc
    cannot be read at all (then every folder counts as in use)."""
    found: set[str] = set()
    prefix = f"{_ENV}=".encode()
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return {"*"}
    for entry in entries:
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        for item in environ.split(b"\0"):
            if item.startswith(prefix):
                found.add(os.fsdecode(item[len(prefix) :]))
    return found
