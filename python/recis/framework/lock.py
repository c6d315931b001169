"""The lock of a run's ``output_dir``: one training run at a time writes there.

An advisory ``fcntl.flock`` on ``output_dir/.lock``, whose content is the
holder's pid (for the refusal's message, nothing else). The kernel drops a
flock when its process dies, however it dies: a lock file left by a killed
run blocks nothing, and nothing here ever deletes it (deleting a lock file
races with a run that has just opened it). It must not: be taken by more
than one rank of a run (``Trainer`` takes it on rank 0 only, see there), or
be relied on across machines that do not share a filesystem's locks.
"""

from __future__ import annotations

import fcntl
import os

LOCK_NAME = ".lock"


class OutputDirLocked(RuntimeError):
    """Another process holds the lock; ``pid`` is its pid (None if unknown)."""

    def __init__(self, path: str, pid: int | None):
        self.path, self.pid = path, pid
        super().__init__(f"{path}: held by pid {pid if pid is not None else 'unknown'}")


class OutputDirLock:
    """Example::

    lock = OutputDirLock("runs/x")
    lock.acquire()      # OutputDirLocked if another run holds it
    ...
    lock.release()
    """

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirLocked(self.path, holder(self.path)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # still held: nobody reads a stale pid
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def holder(path: str) -> int | None:
    """The pid written in the lock file ``path``, if it holds one."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
