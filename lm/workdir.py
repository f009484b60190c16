"""The workdir a training run writes: one live writer at a time, and a directory where one is expected.

`WorkdirLock(workdir)` is held by `lm.train` for the whole run: an exclusive `fcntl.flock` on `workdir/lock`, a file
that also records who holds it (host, pid, start time). The kernel releases the lock when the holder exits, however
it exits (even SIGKILL), so a lock left by a dead process is never in the way; a second trainer on the same workdir
fails at once with one line naming the holder. Readers (`lm.evaluate`, `lm.generate`) take no lock: they write
nothing into a workdir but `eval_<step>.json`.

Only process 0 of a multi-process run locks (the workdir is shared). Workdirs in a bucket (`gs://`) cannot be locked
and are not; on network file systems `flock` is only as good as the file system's support for it.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket

import jax

from lm import paths
from lm.errors import CheckpointError

LOCK_FILE = "lock"


def ensure_directory(workdir: str) -> None:
    """Creates `workdir` if needed; a file in its place is an error."""
    path = paths.resolve(workdir)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"--workdir={workdir} is a file, not a directory")
    path.mkdir(parents=True, exist_ok=True)


class WorkdirLock:
    """`with WorkdirLock(workdir):` the run is the workdir's only writer (module docstring)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        if paths.is_remote(self.workdir) or jax.process_index() != 0:
            return self
        path = os.path.join(os.fspath(paths.resolve(self.workdir)), LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(
                f"{self.workdir} is in use by {holder}; wait for that run to end or use another --workdir") from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"lm.train pid {os.getpid()} on host {socket.gethostname()} since {started}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # No holder any more; the file stays (removing it would race a new locker).
            os.close(self._fd)  # Closing releases the flock.
            self._fd = None
