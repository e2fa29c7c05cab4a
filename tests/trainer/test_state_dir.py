"""The trainer's state-directory lock, with real processes and the kernel's flock."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from liverec.trainer.state_dir import LOCK_FILE, StateDirInUse, StateDirLock

HOLDER = "import sys, time; from pathlib import Path; from liverec.trainer.state_dir import StateDirLock; " \
         "lock = StateDirLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)"


def test_a_held_state_dir_is_refused_naming_its_holder_until_the_holder_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StateDirInUse, match=rf"trainer.state_dir {tmp_path} is in use by another trainer "
                                                rf"\(pid {holder.pid} on "):
            StateDirLock(tmp_path)
        holder.kill()  # SIGKILL: no clean-up of its own; the kernel drops its lock with its descriptors
        holder.wait(timeout=30)
        lock = StateDirLock(tmp_path)
        assert lock.held
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_exclusive_within_a_process_and_ends_with_release_or_the_object(tmp_path: Path) -> None:
    first = StateDirLock(tmp_path)
    with pytest.raises(StateDirInUse):
        StateDirLock(tmp_path)  # flock: another open file description conflicts, same process or not
    first.release()
    assert not first.held
    second = StateDirLock(tmp_path)
    with pytest.raises(StateDirInUse):
        StateDirLock(tmp_path)
    del second
    gc.collect()
    assert StateDirLock(tmp_path).held
