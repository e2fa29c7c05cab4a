"""Exclusive ownership of a trainer's state directory.

Everything that makes the trainer exactly-once lives in `trainer.state_dir`: its checkpoints
(with the offsets they have learned up to), the store's checkpoint chain and the history store.
Two trainers on one directory would each write checkpoints under the same sequence numbers, each
claiming offsets the other learned from. So a trainer locks the directory before it reads
anything and refuses to start while another process holds it, with a message that names the
holder; until now the second trainer failed later, on RocksDB's own lock of the history store,
with a bare IO error.

The lock is `flock` on `state_dir/trainer.lock`. The kernel drops it when its process ends,
however that happens (kill -9, the OOM killer), so a crash never leaves a stale lock behind, as
a pid file would. Holding it is also what makes a crash's leftovers safe to delete: no other
process can be writing a checkpoint there (`CheckpointManager.remove_leftovers`).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = "trainer.lock"


class StateDirInUse(RuntimeError):
    """Another process holds the trainer's state directory."""


class StateDirLock:
    """Held from construction until `release` (or until the object or its process goes)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self._fd: int | None = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "a process that has not yet said which"
            os.close(fd)
            raise StateDirInUse(f"trainer.state_dir {state_dir} is in use by another trainer ({holder}); one "
                                f"directory holds one trainer's checkpoints: stop that one or use another "
                                f"state_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor of the lock releases it
            self._fd = None

    def __del__(self) -> None:
        self.release()
