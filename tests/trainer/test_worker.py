"""The online trainer against the real broker and real RocksDB: recovery, dead letters, metrics."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from kafka import TopicPartition

from liverec.model.codecs.record import decode_record
from liverec.platform.broker import LocalBroker
from liverec.platform.config import ConfigError
from liverec.platform.datasets import load_dataset
from liverec.platform.events import MIN_EVENT_TIME_MS, encode_event
from liverec.platform.kafka import ensure_topics, make_consumer, make_producer
from liverec.platform.replay import rebase_times
from liverec.trainer.items import ITEM_TABLE
from liverec.trainer.worker import TrainerWorker, state_digest
from liverec.v1 import events_pb2
from tests.conftest import assert_refused_beside
from tests.trainer.conftest import log_ends, publish_ml100k, small

# A small model keeps the suite fast; recovery does not depend on the model's size.
SMALL_MODEL = {"LIVEREC_MODEL__ENCODER__DIM": "16", "LIVEREC_MODEL__ENCODER__LAYERS": "1",
               "LIVEREC_MODEL__ENCODER__HEADS": "1", "LIVEREC_MODEL__ENCODER__MAX_LEN": "10",
               "LIVEREC_TRAINER__NEGATIVES": "32", "LIVEREC_TRAINER__BATCH_EVENTS": "64",
               "LIVEREC_TRAINER__CHECKPOINT_EVERY_EVENTS": "256", "LIVEREC_TRAINER__EXPIRE_EVERY_EVENTS": "500",
               "LIVEREC_TRAINER__ITEM_TTL_S": str(30 * 24 * 3600)}
RECOVERY_EVENTS = 3000
REPO = Path(__file__).resolve().parents[2]
KILLS = 5


def train_cmd(state_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "liverec.platform", "train", "--quiet", "--state-dir", str(state_dir),
            "--metrics-port", "0", *extra]


def run_with_kills(cli_env: dict[str, str], state_dir: Path, seed: int, *extra: str) -> dict:
    """kill -9 the trainer at KILLS random moments, restarting it each time, then let it finish.

    Each kill waits until the trainer has checkpointed past a random event count (read from its
    JSON log on stderr), then lands a random fraction of a tenth of a second later: mid-batch,
    between checkpoints, whatever the machine's speed. The last threshold leaves a third of the
    stream: a kill that landed after the trainer had learned everything would leave the next
    restart nothing to checkpoint (the trainer receives while it learns, and learns a few
    thousand small-model events a second).
    """
    env = {**cli_env, **SMALL_MODEL}
    rng = random.Random(seed)
    thresholds = sorted(rng.sample(range(200, RECOVERY_EVENTS - 1000), KILLS))
    for threshold in thresholds:
        proc = subprocess.Popen(train_cmd(state_dir, *extra), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            seen: list[str] = []
            for line in proc.stderr:
                seen = [*seen[-40:], line]
                if '"msg": "checkpoint"' in line and json.loads(line)["applied"] >= threshold:
                    break
            time.sleep(rng.uniform(0.0, 0.1))
            assert proc.poll() is None, "the trainer exited on its own before the kill:\n" + "".join(seen)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    done = subprocess.run(train_cmd(state_dir, "--idle-exit", "4", *extra), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(state_dir.rglob(".tmp-*"))  # what a kill inside a checkpoint write left is gone
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_deterministic_mode_survives_kill_9_bit_for_bit(config, cli_env, ml100k, tmp_path) -> None:
    publish_ml100k(config, ml100k, RECOVERY_EVENTS)
    reference = small(config, tmp_path / "reference", deterministic=True)
    worker = TrainerWorker(reference)
    counters = worker.run(idle_exit_s=3)
    assert counters.applied == RECOVERY_EVENTS

    killed_dir = tmp_path / "killed"
    summary = run_with_kills(cli_env, killed_dir, 1, "--deterministic")
    assert summary["applied"] == RECOVERY_EVENTS

    expected = state_digest(TrainerWorker(reference))
    actual = state_digest(TrainerWorker(small(config, killed_dir, deterministic=True)))
    assert actual == expected  # dense weights, store rows and histories: bit for bit


@pytest.mark.slow
def test_default_mode_applies_every_event_exactly_once_across_kills(config, cli_env, ml100k, tmp_path) -> None:
    publish_ml100k(config, ml100k, RECOVERY_EVENTS)
    summary = run_with_kills(cli_env, tmp_path / "state", 2)
    assert summary["applied"] == RECOVERY_EVENTS and summary["consumed"] == RECOVERY_EVENTS
    assert summary["dead_lettered"] == {}
    # The checkpointed offsets are exactly the log ends: every event consumed once, none twice.
    assert {int(p): o for p, o in summary["offsets"].items()} == log_ends(config)
    # Each user's stored history is the last max_len (10) of exactly the events produced for them.
    table, _ = rebase_times(load_dataset(str(ml100k)).table)
    users, counts = np.unique(table.user_id[:RECOVERY_EVENTS], return_counts=True)
    restored = TrainerWorker(small(config, tmp_path / "state"))
    stored = {user: len(h) for user, h in restored.history.items()}
    assert stored == {int(u): int(min(c, 10)) for u, c in zip(users, counts)}
    # Each item's count in the store is exactly its number of events: the item table counts events
    # on receipt, yet no checkpoint held a count of an event beyond its offsets (none expire: the
    # stream spans 4 days, the TTL is 30).
    keys, _ = restored.store.table_items(ITEM_TABLE)
    items, item_counts = np.unique(table.item_id[:RECOVERY_EVENTS], return_counts=True)
    assert dict(zip(keys.tolist(), restored.store.frequency(ITEM_TABLE, keys).tolist())) == \
        dict(zip(items.tolist(), item_counts.tolist()))


def test_train_refuses_a_state_dir_another_trainer_holds_and_clears_a_crashs_leftovers(config, cli_env, ml100k,
                                                                                        tmp_path) -> None:
    publish_ml100k(config, ml100k, 600)
    env, state_dir = {**cli_env, **SMALL_MODEL}, tmp_path / "state"
    first = subprocess.Popen(train_cmd(state_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert first.stderr is not None
        for line in first.stderr:  # running, and it has checkpointed: a trainer with state to protect
            if '"msg": "checkpoint"' in line:
                break
        assert_refused_beside(first, train_cmd(state_dir, "--idle-exit", "1"), env, "trainer.state_dir", state_dir,
                              "trainer")
    finally:
        first.kill()
        first.wait()
    # What a crash in the middle of checkpoint writes leaves (written here as such: a kill -9 lands
    # inside one only by chance): a trainer's and a store's temporary directory, never renamed.
    torn = [state_dir / "checkpoints" / ".tmp-00000099-4242", state_dir / "store" / ".tmp-00000099-full-0a1b2c"]
    for path in torn:
        path.mkdir()
        (path / "data.bin").write_bytes(b"\0" * 4096)
    done = subprocess.run(train_cmd(state_dir, "--idle-exit", "2"), env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["applied"] == 600
    assert not any(path.exists() for path in torn)
    assert "removed the leftovers of interrupted checkpoint writes" in done.stderr


def test_trainer_warms_up_every_kernel_it_then_runs(config, cli_env, ml100k, tmp_path) -> None:
    """In a fresh process (compiled kernels belong to the process): once a trainer's run has
    connected to Kafka (after its warm-up), its work on the records, with admission by count and
    expiry, compiles nothing more, and the warm-up left the trainer's state as it was."""
    publish_ml100k(config, ml100k, 1500)
    env = {**cli_env, **SMALL_MODEL, "LIVEREC_TRAINER__STATE_DIR": str(tmp_path / "state"),
           "LIVEREC_TRAINER__METRICS_PORT": "-1", "LIVEREC_TRAINER__MIN_COUNT": "2",
           "LIVEREC_TRAINER__ITEM_TTL_S": "3600", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "tests.kernel_warm_up", "trainer"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["applied"] == 1500 and result["expired"] > 0 and result["store_unchanged"]
    assert result["ran"] == result["warmed"]
    assert {"liverec.trainer.decode._parse_wire", "liverec.embedding_store.kernels.cpu_step._dedup",
            "liverec.embedding_store.kernels.cpu_step._apply", "liverec.embedding_store.kernels.cpu._erase_serial"} \
        <= set(result["ran"])


def bad_records() -> dict[str, list[bytes]]:
    t = 1_700_000_000_000

    def ev(**kw: object) -> bytes:
        fields = {"user_id": 5, "item_id": 6, "action": events_pb2.ACTION_CLICK, "event_time_ms": t, **kw}
        return events_pb2.UserEvent(**fields).SerializeToString()

    return {
        "undecodable": [b"\xff\xfe garbage"],
        "wrong_schema": [descriptor_pb2.FileDescriptorProto(name="a.proto").SerializeToString()],
        "missing_field": [ev(item_id=0)],
        "id_out_of_range": [ev(user_id=-3)],
        "time_out_of_range": [ev(event_time_ms=MIN_EVENT_TIME_MS - 1000)],
        "nan_value": [ev(value=float("nan"))],
    }


def test_bad_events_go_to_the_dlq_with_their_reason_and_good_ones_are_applied(config, tmp_path) -> None:
    ensure_topics(config.kafka, config.topics)
    producer = make_producer(config.kafka)
    good = 0
    sent_bad: dict[bytes, str] = {}
    t = 1_700_000_000_000
    for i in range(300):
        producer.send(config.topics.events, key=str(i % 17 + 1).encode(),
                      value=encode_event(i % 17 + 1, i % 29 + 1, events_pb2.ACTION_VIEW, float("nan"), t + i))
        good += 1
        if i % 50 == 0:
            for reason, raws in bad_records().items():
                for raw in raws:
                    producer.send(config.topics.events, key=b"9", value=raw)
                    sent_bad[raw] = reason
    producer.flush()
    producer.close()
    total = good + len(sent_bad) * 6
    worker = TrainerWorker(small(config, tmp_path / "state"))
    counters = worker.run(idle_exit_s=3)
    assert counters.applied == good
    assert counters.consumed == total
    assert sum(counters.dead_lettered.values()) == total - good
    assert set(counters.dead_lettered) == set(bad_records())

    consumer = make_consumer(config.kafka, config.topics.dlq, group_id=f"dlq-{config.topics.dlq}")
    got = []
    deadline = time.monotonic() + 30
    while len(got) < total - good and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            got.extend(records)
    consumer.close()
    assert len(got) == total - good
    for rec in got:
        headers = dict(rec.headers)
        assert headers["reason"].decode() == sent_bad[rec.value]  # original bytes, right reason
        assert headers["source.topic"].decode() == config.topics.events
        assert int(headers["source.offset"]) >= 0


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(config, ml100k, tmp_path) -> None:
    publish_ml100k(config, ml100k, 1000)
    cfg = small(config, tmp_path / "state")
    first = TrainerWorker(cfg)
    first.run(idle_exit_s=3)
    names = first.checkpoints.names()
    assert len(names) >= 2
    newest = first.checkpoints.root / names[-1]
    blob = (newest / "trainer.pt").read_bytes()
    (newest / "trainer.pt").write_bytes(blob[: len(blob) // 2])  # a torn write

    second = TrainerWorker(cfg)
    previous_offsets = sum(second.offsets.values())
    assert 0 < previous_offsets < 1000  # restored from the previous complete checkpoint
    counters = second.run(idle_exit_s=3)
    assert counters.applied == 1000  # the events after it were re-learned, none twice
    assert counters.consumed == 1000


def test_a_restart_keeps_the_checkpoints_item_table_settings_and_says_so(config, ml100k, tmp_path, caplog) -> None:
    """The checkpoint's rows carry per-row Adagrad state: a config now saying Adam is reported,
    field by field, not silently applied; a different embedding width is refused."""
    publish_ml100k(config, ml100k, 300)
    cfg = small(config, tmp_path / "state", item_optimizer="adagrad", item_lr=0.15)
    first = TrainerWorker(cfg)
    first.run(idle_exit_s=2)
    rows = first.store.table(ITEM_TABLE).stats().rows
    assert first.checkpoints.names() and rows > 0

    changed = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, item_optimizer="adam", item_lr=2e-3))
    with caplog.at_level(logging.WARNING, logger="liverec.trainer.worker"):
        restarted = TrainerWorker(changed)
    table = restarted.store.table(ITEM_TABLE)
    assert (table.config.optimizer, table.config.lr) == ("adagrad", 0.15)
    assert table.stats().rows == rows
    (record,) = [r for r in caplog.records if "keeps its own settings" in r.getMessage()]
    assert record.settings == ["trainer.item_optimizer is 'adam' but the checkpoint's item table keeps 'adagrad'",
                               "trainer.item_lr is 0.002 but the checkpoint's item table keeps 0.15"]
    restarted.run(idle_exit_s=1)  # and goes on with them
    assert restarted.store.table(ITEM_TABLE).config.optimizer == "adagrad"

    wider = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, encoder=dataclasses.replace(cfg.model.encoder, dim=32)))
    with pytest.raises(ConfigError, match="model.encoder.dim"):
        TrainerWorker(wider)


def test_metrics_endpoint_exports_the_trainer_series(config, ml100k, tmp_path) -> None:
    publish_ml100k(config, ml100k, 500)
    worker = TrainerWorker(small(config, tmp_path / "state", heap_trim_growth_mb=16))
    ballast = np.ones(8 << 20)  # 64 MB resident since the worker was built: past its growth bound
    worker.run(idle_exit_s=2)
    body = urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).read().decode()
    assert worker.heap_trimmer.trims >= 1 and ballast.sum() == 8 << 20
    resident = next(line for line in body.splitlines() if line.startswith("liverec_trainer_resident_bytes "))
    assert float(resident.split()[1]) > 50e6
    for name in ("liverec_trainer_events_consumed_total 500.0", "liverec_trainer_events_applied_total 500.0",
                 "liverec_trainer_batch_seconds_bucket", "liverec_trainer_loss", "liverec_trainer_prequential_hr10",
                 "liverec_trainer_prequential_ndcg10", 'liverec_store_stat{stat="rows",table="item"}',
                 "liverec_trainer_checkpoint_seconds_count", "liverec_trainer_checkpoint_age_seconds",
                 'liverec_trainer_consumer_lag{partition="0"}', "liverec_trainer_state_versions_behind",
                 "liverec_trainer_state_reencoded_total", "liverec_trainer_state_appends_total",
                 "liverec_trainer_heap_released_bytes_total"):
        assert name in body, name


def test_a_users_state_includes_an_event_before_the_learner_has_learned_it(config, ml100k, tmp_path) -> None:
    """Freshness does not wait for learning: with the learning step held back (the test delays the
    learner's thread; everything else is the real worker, broker and RocksDB), a new event is
    scored, staged and in its user's published state, while the model version, the applied count
    and the stored history have not moved. Released, the step learns it."""
    publish_ml100k(config, ml100k, 300)
    worker = TrainerWorker(small(config, tmp_path / "state", batch_max_ms=10))
    learn, gate, held = worker.learner.learn, threading.Event(), threading.Event()
    gate.set()

    def gated_learn(batch):
        if not gate.is_set():
            held.set()
            gate.wait(60)
        return learn(batch)

    worker.learner.learn = gated_learn
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while worker.counters.applied < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.counters.applied == 300
    version = worker.learner.version

    user, item = next(worker.history.items())[0], 999_999
    observer = make_consumer(config.kafka, group_id=None)
    tps = [TopicPartition(config.topics.user_state, p) for p in range(config.topics.partitions)]
    observer.assign(tps)
    observer.seek_to_end(*tps)
    for tp in tps:
        observer.position(tp)
    gate.clear()
    producer = make_producer(config.kafka, linger_ms=0)
    meta = producer.send(config.topics.events, key=str(user).encode(),
                         value=encode_event(user, item, events_pb2.ACTION_CLICK, 1.0,
                                            int(time.time() * 1000))).get(timeout=30)
    producer.close()
    try:
        found = None
        deadline = time.monotonic() + 60
        while found is None and time.monotonic() < deadline:
            for records in observer.poll(timeout_ms=200).values():
                for rec in records:
                    if int(rec.key) == user and decode_record(rec.value).last_offset >= meta.offset:
                        found = rec
        assert found is not None, "no state record for the new event"
        assert held.wait(30)  # the step with the new event is in flight, held back
        record = decode_record(found.value)
        assert record.model_version == version == worker.learner.version
        assert worker.counters.applied == 300
        assert item not in worker.history.get_many(np.array([user]))[0].item  # not learned yet
        assert item in np.frombuffer(dict(found.headers)["seen"], dtype="<i8")  # but in the served state
    finally:
        gate.set()
        observer.close()
    deadline = time.monotonic() + 60
    while worker.counters.applied < 301 and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert worker.counters.applied == 301 and worker.learner.version > version
        assert item in worker.history.get_many(np.array([user]))[0].item
    finally:
        worker.stop.set()
        thread.join(timeout=60)


@pytest.mark.parametrize("deterministic", [False, True])
def test_idle_exit_waits_out_a_stalled_broker_and_still_reads_the_whole_log(config, ml100k, tmp_path,
                                                                             deterministic) -> None:
    """`idle_exit_s` is quiet time once caught up with the log, not time without records: a broker
    that answers nothing for longer (stopped with SIGSTOP right after the trainer connects, on a
    broker of this test's own) must not end the run with the log unread. On a loaded machine a
    slow first fetch is the same situation."""
    with LocalBroker() as own:
        cfg = dataclasses.replace(config, kafka=dataclasses.replace(config.kafka, bootstrap_servers=own.bootstrap))
        publish_ml100k(cfg, ml100k, 400)
        worker = TrainerWorker(small(cfg, tmp_path / "state", deterministic=deterministic))
        connect = worker._connect
        stalled = threading.Event()
        resume = threading.Timer(2.5, os.kill, (own.pid, signal.SIGCONT))

        def connect_then_stall() -> None:
            connect()
            os.kill(own.pid, signal.SIGSTOP)
            stalled.set()
            resume.start()

        worker._connect = connect_then_stall
        try:
            counters = worker.run(idle_exit_s=1)
        finally:
            resume.cancel()
            os.kill(own.pid, signal.SIGCONT)
        assert stalled.is_set()
        assert counters.applied == counters.consumed == 400
        ends = log_ends(cfg)
        assert {p: worker.offsets.get(p, 0) for p in ends} == ends
