"""Exclusive ownership of a process's state directory (the trainer's, a serving replica's).

Everything that makes the trainer exactly-once lives in `trainer.state_dir`: its checkpoints
(with the offsets they have learned up to), the store's checkpoint chain and the history store.
Two trainers on one directory would each write checkpoints under the same sequence numbers, each
claiming offsets the other learned from; two serving replicas would interleave their state
stores. So each takes an exclusive lock on its directory before it reads anything there and
refuses to start while another process holds it, with a message naming the field and the holder.
(Until this lock the second process failed later, on RocksDB's own lock of its database, with
a bare IO-error traceback.)

The lock is `flock` on `<state_dir>/<owner>.lock`. The kernel drops it when its process ends,
however that happens (kill -9, the OOM killer), so a crash never leaves a stale lock behind, as
a pid file would. Holding it is also what makes a crash's leftovers safe to delete: no other
process can be writing there (the trainer's `CheckpointManager.remove_leftovers`).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from liverec.platform.config import ConfigError


class StateDirInUse(RuntimeError):
    """Another process holds the state directory."""


class StateDirLock:
    """Held from construction until `release` (or until the object or its process goes).

    `owner` names the kind of process (and the lock file: `trainer.lock`), `field` the
    configuration field the directory came from, for the messages. The directory is created if
    need be; one that cannot be (or cannot hold the lock file) is a ConfigError naming `field`."""

    def __init__(self, state_dir: Path, *, owner: str, field: str) -> None:
        self.path = Path(state_dir) / f"{owner}.lock"
        self._fd: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # a path through a file, a read-only or full volume...
            raise ConfigError(field, f"{state_dir} cannot hold the {owner}'s state: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "a process that has not yet said which"
            os.close(fd)
            raise StateDirInUse(f"{field} {state_dir} is in use by another {owner} process ({holder}); a "
                                f"directory holds one {owner} process's state: stop that one or use another "
                                f"{field}") from None
        except OSError as exc:  # a filesystem without locks
            os.close(fd)
            raise ConfigError(field, f"{state_dir} cannot be locked for the {owner}: {exc.strerror or exc}") from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor of the lock releases it
            self._fd = None

    def __del__(self) -> None:
        self.release()
