"""A serving replica materialises the trainer's parameters and survives restarts from its own store."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import torch

from liverec.platform.state_dir import StateDirLock
from liverec.serving.replica import Replica
from liverec.trainer.items import ITEM_TABLE
from liverec.trainer.worker import TrainerWorker
from tests.conftest import assert_refused_beside
from tests.trainer.conftest import publish_ml100k, small


def no_states(values, snapshot):
    return [None] * len(values)


def wait_for(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_replica_swaps_in_published_versions_and_resumes_after_restart(config, ml100k, tmp_path) -> None:
    publish_ml100k(config, ml100k, 800)
    cfg = small(config, tmp_path / "trainer", publish_every_s=0.2)
    cfg = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, state_dir=str(tmp_path / "serving"),
                                                               device="cpu", ready_max_lag=0))
    worker = TrainerWorker(cfg)
    worker.run(idle_exit_s=2)

    replica = Replica(cfg, no_states)
    assert replica.snapshot() is None and not replica.ready()
    replica.start()
    try:
        wait_for(lambda: replica.ready() and replica.snapshot().version == worker.learner.version)
        snap = replica.snapshot()
        keys, weights = worker.store.table_items(ITEM_TABLE)
        order = torch.argsort(keys)
        assert torch.equal(snap.item_keys, keys[order])
        assert torch.equal(snap.item_rows, weights[order].float())
        for name, tensor in worker.learner.serving_model.state_dict().items():
            assert torch.equal(snap.model.state_dict()[name], tensor), name
    finally:
        replica.stop()

    restarted = Replica(cfg, no_states)
    # Before consuming anything: the committed version comes back from the replica's own RocksDB.
    assert restarted.snapshot() is not None and restarted.snapshot().version == snap.version
    assert torch.equal(restarted.snapshot().item_rows, snap.item_rows)
    restarted.start()
    try:
        wait_for(restarted.ready)  # resumed from stored offsets: nothing left to re-read
        assert restarted.snapshot().version == snap.version
    finally:
        restarted.stop()


def test_a_second_serve_on_the_same_state_dir_is_refused_naming_the_first(cli_env, tmp_path) -> None:
    state_dir = tmp_path / "serving"
    cmd = [sys.executable, "-m", "liverec.platform", "serve", "--port", "0", "--state-dir", str(state_dir),
           "--metrics-port", "0", "--device", "cpu"]
    first = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline().startswith("serving liverec.v1.Recommender on")
        assert_refused_beside(first, cmd, cli_env, "serving.state_dir", state_dir, "serving")
    finally:
        first.terminate()
        first.wait(timeout=60)
    assert StateDirLock(state_dir, owner="serving", field="serving.state_dir").held  # released with its process
