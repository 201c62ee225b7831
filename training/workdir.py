"""The workdir lock: one training run per workdir at a time.

A run holds an exclusive `flock` on `WORKDIR/train.lock` from before it writes anything in the workdir until
its last checkpoint is on disk; the file holds the holder's pid and host, for the message a second run prints.
The kernel drops a flock when its holder dies in any way (SIGKILL included), so a crashed run never blocks the
re-run, and no pid has to be probed: a lock that cannot be taken is held by a live process. On NFS, Linux
makes the flock a lock on the server, which drops it once it learns the client is gone (NFSv4: when the
client's lease, about 90 s, runs out; NFSv3: when the rebooted client tells it), so a run on a lost machine
blocks the re-run elsewhere only until then. A file system without locks (flock fails with ENOLCK,
EOPNOTSUPP or ENOSYS) gets a one-line warning and no lock.
On several hosts, process 0 alone takes it and tells the others whether it could.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import socket
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_NAME = "train.lock"
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


class WorkdirError(RuntimeError):
    """A workdir this run cannot use; entry points print the one-line message and exit with code 2."""


class WorkdirInUse(WorkdirError):
    """Another live run holds the workdir's lock."""


class WorkdirLock:
    """An exclusive lock on one workdir, created (with the workdir) by `acquire`."""

    def __init__(self, workdir: pathlib.Path, file, created: bool):
        self.workdir, self._file, self._created = workdir, file, created

    @classmethod
    def acquire(cls, workdir: str | pathlib.Path) -> WorkdirLock:
        """Takes the lock at once or raises WorkdirInUse naming the holder's pid and host."""
        workdir = pathlib.Path(workdir)
        created = not workdir.exists()
        path = workdir / LOCK_NAME
        while True:
            try:
                workdir.mkdir(parents=True, exist_ok=True)
                f = open(path, "a+")  # noqa: SIM115 (held open for the whole run)
            except OSError as e:
                raise WorkdirError(f"{workdir}: cannot create {LOCK_NAME} there ({e.strerror})") from None
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise WorkdirInUse(
                    f"{workdir}: in use by {holder(path)}; wait for that run or use another workdir"
                ) from None
            except OSError as e:
                if e.errno not in NO_LOCKS:
                    f.close()
                    raise
                print(f"warning: {workdir} cannot be locked ({e.strerror}): a second run there would not be stopped", file=sys.stderr, flush=True)  # fmt: skip
                return cls(workdir, f, created)
            # A releasing run unlinks the file: if ours was unlinked between open and flock, lock the new one.
            try:
                same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        return cls(workdir, f, created)

    def release(self) -> None:
        """Drops the lock and its file; a workdir that `acquire` created and nothing else used goes too."""
        if self._file.closed:
            return
        path = self.workdir / LOCK_NAME
        path.unlink(missing_ok=True)  # while still locked, so nobody locks the old file after us
        self._file.close()
        if self._created:
            try:
                self.workdir.rmdir()  # only when empty
            except OSError:
                pass


def holder(path: pathlib.Path) -> str:
    """What the lock file says about its holder (which writes it right after taking the lock)."""
    for _ in range(20):
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return text
        time.sleep(0.05)
    return "another process (its lock file names none yet)"


def hold_workdir(workdir: str | pathlib.Path) -> WorkdirLock | None:
    """The workdir's lock, taken by process 0 (None elsewhere); every process raises WorkdirError when process 0
    could not take it, so all of them stop before touching the workdir."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock.acquire(workdir)
        except WorkdirError as e:
            error = e
    if jax.process_count() > 1:
        taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not taken and error is None:
            error = WorkdirError(f"{workdir}: process 0 could not lock it (see its error)")
    if error is not None:
        raise error
    return lock
