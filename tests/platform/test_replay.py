"""`liverec replay` through the real broker: every event arrives once, in per-user order, intact."""

import json
import math
import subprocess
import sys
from collections import defaultdict

import numpy as np

from liverec.platform.datasets import SyntheticConfig, load_dataset, synthetic
from liverec.platform.events import event_key
from liverec.platform.kafka import make_admin, make_consumer, make_producer
from liverec.platform.replay import rebase_times
from liverec.trainer.source import EventSource


def consume_all(config, topic: str, expected: int, timeout_s: float = 60.0):
    """Consume `topic` in a consumer group until `expected` valid events arrived (or timeout)."""
    import time

    source = EventSource(make_consumer(config.kafka, topic, group_id=f"g-{topic}"))
    batches, rejected = [], 0
    deadline = time.monotonic() + timeout_s
    try:
        while sum(len(b) for b in batches) < expected and time.monotonic() < deadline:
            polled = source.poll(timeout_ms=500)
            rejected += len(polled.rejected)
            if len(polled.batch):
                batches.append(polled.batch)
        # Nothing beyond `expected` may follow: a duplicate would show up here.
        extra = source.poll(timeout_ms=1500)
        rejected += len(extra.rejected)
        if len(extra.batch):
            batches.append(extra.batch)
    finally:
        source.consumer.close()
    return batches, rejected


def run_replay(cli_env, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "liverec.platform", "replay", "--quiet", *args],
                         env=cli_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_replay_delivers_every_event_once_in_user_order(config, cli_env) -> None:
    n = 5000
    summary = run_replay(cli_env, "--dataset", "synthetic", "--seed", "11", "--limit", str(n))
    assert summary["events"] == n and summary["topic"] == config.topics.events
    expected, _ = rebase_times(synthetic(SyntheticConfig(seed=11)).slice(0, n))

    batches, rejected = consume_all(config, config.topics.events, n)
    assert rejected == 0
    got = {k: np.concatenate([getattr(b, k) for b in batches]) for k in
           ("user_id", "item_id", "action", "value", "event_time_ms", "partition", "offset")}
    assert len(got["user_id"]) == n  # every event once: no loss, no duplicate

    # (partition, offset) pairs are unique: nothing was written twice
    assert len(set(zip(got["partition"].tolist(), got["offset"].tolist()))) == n

    def per_user(cols):
        seqs = defaultdict(list)
        for u, i, a, v, t in zip(*(cols[k].tolist() for k in ("user_id", "item_id", "action", "value", "event_time_ms"))):
            seqs[u].append((i, a, None if math.isnan(v) else v, t))
        return seqs

    want = per_user({k: getattr(expected, k) for k in ("user_id", "item_id", "action", "value", "event_time_ms")})
    have = per_user(got)
    assert have == want  # same users, same events per user, same order, fields intact

    # a user's events all land on one partition (keyed by user id)
    parts = defaultdict(set)
    for u, p in zip(got["user_id"].tolist(), got["partition"].tolist()):
        parts[u].add(p)
    assert all(len(p) == 1 for p in parts.values())
    assert len({p for ps in parts.values() for p in ps}) > 1  # and users spread over partitions
    # ... the partition kafka-python's default partitioner (murmur2, Java-compatible) gives the key,
    # which the replay works out once per user instead of per send
    assert {u: ps.pop() for u, ps in parts.items()} == default_partitions(config, sorted(parts))


def default_partitions(config, users: list[int]) -> dict[int, int]:
    """Each user's partition as a plain producer, left to its default partitioner, writes it: one
    record per user to a scratch topic with as many partitions as the events topic."""
    from kafka.admin import NewTopic

    topic = "replay-partition-check"
    admin = make_admin(config.kafka)
    try:
        admin.create_topics([NewTopic(topic, config.topics.partitions, 1)])
    finally:
        admin.close()
    producer = make_producer(config.kafka)
    try:
        futures = {u: producer.send(topic, key=event_key(u), value=b"") for u in users}
        return {u: future.get(timeout=30).partition for u, future in futures.items()}
    finally:
        producer.close()


def test_replay_ml100k_rebases_old_timestamps(config, cli_env, ml100k) -> None:
    summary = run_replay(cli_env, "--dataset", str(ml100k), "--limit", "2000", "--rate", "20000")
    assert summary["events"] == 2000
    assert summary["time_shift_ms"] > 0  # 1997 data moved past the trainer's 2000-01-01 floor
    source_table = load_dataset(str(ml100k)).table
    batches, rejected = consume_all(config, config.topics.events, 2000)
    assert rejected == 0
    times = np.concatenate([b.event_time_ms for b in batches])
    assert len(times) == 2000
    assert sorted(times.tolist()) == (source_table.event_time_ms[:2000] + summary["time_shift_ms"]).tolist()


def test_replay_rejects_malformed_file_with_line_number(cli_env, tmp_path) -> None:
    bad = tmp_path / "bad.inter"
    bad.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t2\t3\t881250949\n1\tx\t3\t881250950\n")
    out = subprocess.run([sys.executable, "-m", "liverec.platform", "replay", "--quiet", "--dataset", str(bad)],
                         env=cli_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"{bad}:3:" in out.stderr
    lenient = run_replay(cli_env, "--dataset", str(bad), "--lenient")
    assert lenient["events"] == 1 and lenient["skipped_lines"] == 1
