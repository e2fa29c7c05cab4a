"""`liverec bench startup`: how long a new trainer takes to be ready, and whether its first events wait.

A new trainer pod starts with numba's cache empty (the cache lives in an emptyDir), and numba
compiles a kernel on its first call: the trainer compiles (or loads) every kernel its decoding
and its store will call before it connects (`TrainerWorker.warm_up`), so that no event waits on
that. Measured here, for a cold cache (a fresh NUMBA_CACHE_DIR) and then a warm one (the same
directory, filled by the cold run; the baseline), each with a trainer process (`liverec train`,
a fresh state directory) against a local broker:

- ready: process start to its metrics endpoint answering (config, the state directory, the
  kernels' warm-up, Kafka; the endpoint starts last);
- warm-up: the trainer's own "compiled kernels ready" seconds, from its log;
- events after ready: `--events` events for new users, produced one at a time; each one's time
  from send to its user's state record on liverec.user-state (created by the trainer's receive
  path: decode, admission, history, the state's encoding; the trainer's share of freshness,
  read from the record's CreateTime as `bench freshness` does). The first event against the
  median of the rest: a first event that waited on compilation would stand out (before the
  warm-up, the first poll with a cold cache waited ~12 s on it here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.freshness import stop_process, wait_port
from benchmarks.report import machine, report

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
FIRST_USER = 900_000_000  # users nobody else uses: each event is its user's first


def warm_up_seconds(log: Path) -> float | None:
    for line in log.read_text(errors="replace").splitlines():
        if '"compiled kernels ready"' in line:
            return float(json.loads(line[line.index("{"):])["seconds"])
    return None


def event_to_state_ms(config, users: list[int]) -> list[float]:
    """Per user in turn: produce one event, wait for the user's state record; ms from send to the
    record's creation."""
    from kafka import TopicPartition

    from liverec.platform.events import encode_event
    from liverec.platform.kafka import make_consumer, make_producer
    from liverec.v1 import events_pb2

    consumer = make_consumer(config.kafka, group_id=None, fetch_max_wait_ms=10)
    topic = config.topics.user_state
    tps = [TopicPartition(topic, p) for p in range(config.topics.partitions)]
    consumer.assign(tps)
    consumer.seek_to_end(*tps)
    for tp in tps:
        consumer.position(tp)
    producer = make_producer(config.kafka, linger_ms=0)
    times = []
    try:
        for user in users:
            sent = time.time()
            value = encode_event(user, user, events_pb2.ACTION_CLICK, float("nan"), int(sent * 1000))
            producer.send(config.topics.events, key=str(user).encode(), value=value).get(timeout=30)
            created = None
            deadline = time.monotonic() + 60
            while created is None and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=50).values():
                    created = next((r.timestamp / 1000 for r in records if r.key and int(r.key) == user), created)
            if created is None:
                raise RuntimeError(f"no state record for user {user} within 60 s")
            times.append((created - sent) * 1000)
    finally:
        producer.close()
        consumer.close()
    return times


def one_start(config, cli: list[str], env: dict[str, str], work: Path, name: str, users: list[int]) -> dict:
    from liverec.platform.broker import free_ports

    (port,) = free_ports(1)
    log = work / f"trainer-{name}.log"
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cli + ["train", "--quiet", "--state-dir", str(work / f"state-{name}"),
                                       "--metrics-port", str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        wait_port(port, proc, "trainer", log, timeout=600)
        ready = time.perf_counter() - start
        times = event_to_state_ms(config, users)
    finally:
        stop_process(proc)
    return {"cache": name, "ready_s": ready, "warm_up_s": warm_up_seconds(log), "first_event_ms": times[0],
            "rest_median_ms": statistics.median(times[1:]), "rest_max_ms": max(times[1:]), "events_ms": times}


def run(args: argparse.Namespace) -> dict:
    from liverec.platform.broker import LocalBroker
    from liverec.platform.config import load_config
    from liverec.platform.kafka import ensure_topics

    work = Path(tempfile.mkdtemp(prefix="liverec-bench-startup-"))
    rows = []
    try:
        with LocalBroker(log_dir=work / "broker") as broker:
            base = load_config(None)
            config = dataclasses.replace(base, kafka=dataclasses.replace(base.kafka,
                                                                          bootstrap_servers=broker.bootstrap))
            ensure_topics(config.kafka, config.topics)
            cli = [sys.executable, "-m", "liverec.platform", "--bootstrap", broker.bootstrap]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "NUMBA_CACHE_DIR": str(work / "numba")}
            for i, name in enumerate(("cold", "warm")):
                users = list(range(FIRST_USER + 1000 * i, FIRST_USER + 1000 * i + args.events))
                rows.append(one_start(config, cli, env, work, name, users))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cold, warm = rows
    return {"benchmark": "startup", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
            "events_per_start": args.events, "rows": rows,
            "cold_vs_warm": {"ready": cold["ready_s"] / warm["ready_s"],
                             "first_event": cold["first_event_ms"] / warm["first_event_ms"]}}


def print_table(r: dict) -> None:
    print(f"startup benchmark — {r['date']}, {r['machine']}, {r['events_per_start']} events after each start")
    print(f"  {'numba cache':<12}{'ready s':>9}{'warm-up s':>11}{'1st event ms':>14}{'rest p50 ms':>13}"
          f"{'rest max ms':>13}")
    for row in r["rows"]:
        print(f"  {row['cache']:<12}{row['ready_s']:>9.2f}{row['warm_up_s'] or float('nan'):>11.2f}"
              f"{row['first_event_ms']:>14.1f}{row['rest_median_ms']:>13.1f}{row['rest_max_ms']:>13.1f}")
    ratio = r["cold_vs_warm"]
    print(f"  cold / warm (baseline): ready {ratio['ready']:.2f}x, first event {ratio['first_event']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="liverec bench startup", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20, help="events produced after each start (at least 2)")
    parser.add_argument("--out", type=Path, default=RESULTS / "startup.json")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.events < 2:
        parser.error("--events must be at least 2 (the first event against the rest)")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `liverec` sets for its processes
    report(run(args), args.out, print_table, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
