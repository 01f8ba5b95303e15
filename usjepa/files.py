"""Writing outputs safely: atomic replacement with ordinary permissions, and one writer per output folder.

Standard library only, so that every layer (models, shards, ingest, train) can use it.

* ``atomic_path``: write to a temporary file beside the target, fsync, rename over it. The file ends up with
  the permissions of a file created the ordinary way (0666 minus the umask), whatever the writer did: some
  writers (safetensors' ``save_file``) create their file 0600, which made exports unreadable to the group.
* ``exclusive_lock``: a ``flock`` on a lock file that fails at once if another process holds it, so that two
  runs never write one output folder. Used by ``usjepa-ingest`` (per part) and ``usjepa-train`` (per --out).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

# Descriptors of the locks this process holds. A flock belongs to the open file, which fork() shares: a loader
# worker forked while its trainer holds the lock would hold it too, and keep the folder "locked" after the
# trainer was killed. Forked children close their copies at once (the parent's lock is untouched).
_held_lock_fds: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held_lock_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_lock_fds.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable. Best effort: some filesystems refuse fsync on a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: the file written at ``tmp`` is fsynced and renamed over ``p``
    when the block ends without an exception (a crash mid-write leaves ``p`` as it was); on an exception the
    temporary file is removed. ``p`` gets the mode an ordinary ``open(p, "w")`` would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    # Created here, through the umask, so its mode is the ordinary one; a writer that replaces or chmods the
    # file does not get to choose the final mode.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o7777
    try:
        yield tmp
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, refusal: Exception) -> Iterator[None]:
    """Hold ``path`` exclusively (flock) for the block, or raise ``refusal`` (the caller's own error, saying
    who holds it and what to do) at once.

    The holder unlinks the file when the block ends, so a lock taken on a file that was unlinked meanwhile is
    stale: retry on the new one. A killed holder leaves the file behind, but the kernel drops its flock, so the
    next run takes it. (flock is per open file: a second ``exclusive_lock`` in the same process also fails.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise refusal from None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    _held_lock_fds.add(f.fileno())
    try:
        yield
    finally:
        _held_lock_fds.discard(f.fileno())
        path.unlink(missing_ok=True)
        f.close()
