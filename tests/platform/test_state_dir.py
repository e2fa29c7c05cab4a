"""The state-directory lock (trainer, serving), with real processes and the kernel's flock."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from liverec.platform.config import ConfigError
from liverec.platform.state_dir import StateDirInUse, StateDirLock

HOLDER = "import sys, time; from pathlib import Path; from liverec.platform.state_dir import StateDirLock; " \
         "lock = StateDirLock(Path(sys.argv[1]), owner='trainer', field='trainer.state_dir'); " \
         "print('held', flush=True); time.sleep(120)"


def lock_as_trainer(state_dir: Path) -> StateDirLock:
    return StateDirLock(state_dir, owner="trainer", field="trainer.state_dir")


def test_a_held_state_dir_is_refused_naming_its_holder_until_the_holder_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StateDirInUse, match=rf"trainer.state_dir {tmp_path} is in use by another trainer "
                                                rf"process \(pid {holder.pid} on "):
            lock_as_trainer(tmp_path)
        holder.kill()  # SIGKILL: no clean-up of its own; the kernel drops its lock with its descriptors
        holder.wait(timeout=30)
        lock = lock_as_trainer(tmp_path)
        assert lock.held
        assert (tmp_path / "trainer.lock").read_text().startswith(f"pid {os.getpid()} on ")
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_exclusive_within_a_process_and_ends_with_release_or_the_object(tmp_path: Path) -> None:
    first = lock_as_trainer(tmp_path)
    with pytest.raises(StateDirInUse):
        lock_as_trainer(tmp_path)  # flock: another open file description conflicts, same process or not
    first.release()
    assert not first.held
    second = lock_as_trainer(tmp_path)
    with pytest.raises(StateDirInUse):
        lock_as_trainer(tmp_path)
    del second
    gc.collect()
    assert lock_as_trainer(tmp_path).held


def test_each_kind_of_process_has_its_own_lock_in_a_directory(tmp_path: Path) -> None:
    trainer = lock_as_trainer(tmp_path)
    serving = StateDirLock(tmp_path, owner="serving", field="serving.state_dir")
    assert trainer.held and serving.held
    with pytest.raises(StateDirInUse, match=r"serving.state_dir .* is in use by another serving process"):
        StateDirLock(tmp_path, owner="serving", field="serving.state_dir")


def test_a_state_dir_that_cannot_be_made_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=rf"^trainer.state_dir: {blocker}/state cannot hold the trainer's state: "
                                          r"Not a directory$"):
        lock_as_trainer(blocker / "state")


@pytest.mark.parametrize(("command", "field"), [(["train", "--quiet"], "trainer.state_dir"),
                                                (["serve", "--port", "0", "--device", "cpu"], "serving.state_dir")])
def test_the_cli_reports_an_unusable_state_dir_as_a_configuration_error(tmp_path: Path, command: list[str],
                                                                        field: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEREC_")}
    done = subprocess.run([sys.executable, "-m", "liverec.platform", *command, "--state-dir", str(blocker / "state")],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"configuration error: {field}: {blocker}/state cannot hold the " in done.stderr
    assert "Traceback" not in done.stderr
