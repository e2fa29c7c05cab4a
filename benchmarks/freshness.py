"""`liverec bench freshness`: time from producing an event to the first Recommend answer whose state includes it.

Processes: a local Tansu broker, the trainer (`liverec train`, its own process), a serving
replica (`liverec serve`, its own process), and this one, which replays the dataset and sends
the probes. Before the clock starts, the first `--warm-events` events of the dataset are
published and the trainer learns them; then the rest of the dataset is replayed at a steady
`--replay-rate` (one event at a time, evenly spaced) while probes run.

A probe: an event for a known user (one of the warm events' users, round-robin) with an item id
nobody has used before, produced with linger 0; its offset comes from the producer's
RecordMetadata. The probe then asks the replica for that user's top-10 until an answer's
`state_version` (the offset of the newest event the served state includes) is ≥ the probe's
offset: freshness is the time from just before `send` to the arrival of that answer. Probes
start at `--probe-rate` per second and overlap.

Polling. Every in-flight probe asks every `--coarse-poll-ms` until an observer consumer in this
process has seen the trainer's state record for that user on `liverec.user-state`, then every
`--poll-ms` (tight) until served: that keeps the request load low on a small machine while
still timing the arrival closely. The observer is a consumer like the replica's, so the
replica can hardly see the record much sooner; at worst, a probe's result is late by one coarse
interval (it never makes freshness look better).

Breakdown per probe (medians and p99 reported):
- ack: send to the broker's acknowledgement;
- trainer: send to the creation time of the trainer's state record for the user that includes
  the probe (Kafka CreateTime, set by the trainer's producer: its fetch, then its receive path:
  decode, admission, history staging, the state encode; learning is not on this path);
- delivery: that record's creation to its arrival at the observer consumer (producer linger,
  broker, fetch; the observer fetches with a 10 ms max wait);
- serve: the observer's arrival to the served answer (replica fetch and RocksDB apply, poll
  granularity, the request itself).
The trainer's own stage times (its Prometheus histogram) over the probe phase are reported
beside them: per received chunk on its main thread (decode, the whole receive path) and per
learned micro-batch on the learner's thread.

The local Tansu broker answers an idle fetch only when the consumer's fetch_max_wait_ms (kafka-
python's default: 500 ms) has passed, even if records arrive meanwhile (measured here: a record
reaches a polling consumer after ~250 ms median at 500 ms, ~8 ms at 10 ms). The trainer and the
replica consume with the defaults, so each adds up to that wait; `--env` passes settings to both
processes for what-if runs.

Targets: p50 ≤ 100 ms, p99 ≤ 500 ms. On a small shared CPU these may be missed; the breakdown
says where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.report import machine, write_result
from liverec.platform.kafka import native_crc32c

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TARGETS_MS = {"p50": 100.0, "p99": 500.0}
PROBE_ITEM_BASE = 10_000_000  # probe items: PROBE_ITEM_BASE + i, never used by the dataset
OBSERVER_FETCH_WAIT_MS = 10


@dataclasses.dataclass
class Probe:
    index: int
    user: int
    item: int
    sent: float = 0.0  # time.time() just before send
    acked: float = 0.0
    partition: int = -1
    offset: int = -1
    state_created: float | None = None  # the trainer's state record (CreateTime)
    state_observed: float | None = None  # its arrival at the observer
    served: float | None = None
    served_version: int = -1
    polls: int = 0
    cold_polls: int = 0
    observed_event: asyncio.Event | None = None

    def as_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "observed_event"}
        d["freshness_ms"] = (self.served - self.sent) * 1000 if self.served else None
        return d


class Observer:
    """Consumes liverec.user-state from its end; tells each waiting probe when its state appears."""

    def __init__(self, config, loop: asyncio.AbstractEventLoop) -> None:
        from kafka import TopicPartition

        from liverec.platform.kafka import make_consumer

        self.loop = loop
        # A short fetch wait: the local broker holds an idle fetch for its full max wait even when
        # records arrive meanwhile, and the observer must not add that to the breakdown.
        self.consumer = make_consumer(config.kafka, group_id=None, fetch_max_wait_ms=OBSERVER_FETCH_WAIT_MS)
        topic = config.topics.user_state
        parts = self.consumer.partitions_for_topic(topic) or set()
        deadline = time.monotonic() + 30
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = self.consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:
            self.consumer.position(tp)  # resolve the end now, before any probe is sent
        self.waiting: dict[int, list[Probe]] = {}
        self.latest: dict[int, tuple[int, float, float]] = {}  # user -> (last offset, created, observed)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.records = 0
        self.thread = threading.Thread(target=self._run, name="observer", daemon=True)
        self.thread.start()

    def watch(self, probe: Probe) -> None:
        with self.lock:
            seen = self.latest.get(probe.user)
            if seen is None or seen[0] < probe.offset:
                self.waiting.setdefault(probe.user, []).append(probe)
                return
        # The state came out between the broker's ack and this call (rare): take that record.
        probe.state_created, probe.state_observed = seen[1], seen[2]
        if probe.observed_event is not None:
            self.loop.call_soon_threadsafe(probe.observed_event.set)

    def _run(self) -> None:
        from liverec.model.codecs.record import RecordError, decode_record

        while not self.stop.is_set():
            polled = self.consumer.poll(timeout_ms=20)
            now = time.time()
            for records in polled.values():
                for rec in records:
                    self.records += 1
                    if rec.value is None:
                        continue
                    try:
                        last = decode_record(rec.value).last_offset
                    except RecordError:
                        continue
                    user = int(rec.key)
                    with self.lock:
                        self.latest[user] = (last, rec.timestamp / 1000.0, now)
                        probes = self.waiting.get(user, [])
                        hit = [p for p in probes if p.offset >= 0 and p.offset <= last]
                        if hit:
                            self.waiting[user] = [p for p in probes if p not in hit]
                    for p in hit:
                        p.state_created = rec.timestamp / 1000.0
                        p.state_observed = now
                        if p.observed_event is not None:
                            self.loop.call_soon_threadsafe(p.observed_event.set)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.consumer.close()


class Steady:
    """Publishes events one at a time at a steady rate from a thread (a live stream, not bursts)."""

    def __init__(self, config, table, rate: float) -> None:
        from liverec.platform.events import encode_table
        from liverec.platform.kafka import make_producer

        self.producer = make_producer(config.kafka)
        self.topic = config.topics.events
        self.pairs = encode_table(table)
        self.rate = rate
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="replay", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        for key, value in self.pairs:
            if self.stop.is_set():
                break
            wait = start + self.sent / self.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self.producer.send(self.topic, key=key, value=value)
            self.sent += 1

    def close(self) -> float:
        self.stop.set()
        self.thread.join(timeout=10)
        self.producer.flush()
        self.producer.close()
        return self.sent


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# Stages the trainer times per received chunk on its main thread (the rest: per learned micro-batch).
RECEIVE_STAGES = ("decode", "receive")


def stage_means(before: dict, after: dict) -> dict:
    """Mean seconds per micro-batch of each trainer stage between two scrapes, and batches."""
    out: dict[str, dict] = {}
    for (name, labels), value in after.items():
        if name != "liverec_trainer_batch_seconds_count":
            continue
        stage = dict(labels)["stage"]
        n = value - before.get((name, labels), 0.0)
        s = after[("liverec_trainer_batch_seconds_sum", labels)] - before.get(("liverec_trainer_batch_seconds_sum", labels), 0.0)
        if n > 0:
            out[stage] = {"batches": n, "mean_ms": s / n * 1000}
    return out


def counter(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 120.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:.0f} s: {log.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def probe_phase(args: argparse.Namespace, config, users: list[int], grpc_port: int, result: dict,
                      trainer_port: int, server_metrics_port: int) -> list[Probe]:
    import grpc
    import grpc.aio

    from liverec.platform.events import encode_event
    from liverec.platform.kafka import make_producer
    from liverec.v1 import events_pb2, recommender_pb2, recommender_pb2_grpc

    loop = asyncio.get_running_loop()
    producer = make_producer(config.kafka, linger_ms=0)
    observer = Observer(config, loop)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = recommender_pb2_grpc.RecommenderStub(channel)
    topic = config.topics.events
    deadline_s = args.probe_timeout

    async def send(p: Probe) -> None:
        done: asyncio.Future = loop.create_future()
        p.sent = time.time()
        value = encode_event(p.user, p.item, events_pb2.ACTION_CLICK, float("nan"), int(p.sent * 1000))
        future = producer.send(topic, key=str(p.user).encode(), value=value)
        future.add_callback(lambda md: loop.call_soon_threadsafe(done.set_result, md) if not done.done() else None)
        future.add_errback(lambda exc: loop.call_soon_threadsafe(done.set_exception, exc) if not done.done() else None)
        md = await asyncio.wait_for(done, timeout=30)
        p.acked = time.time()
        p.partition, p.offset = md.partition, md.offset

    async def run(p: Probe) -> None:
        p.observed_event = asyncio.Event()
        await send(p)
        observer.watch(p)
        give_up = p.sent + deadline_s
        while time.time() < give_up:
            try:
                r = await stub.Recommend(recommender_pb2.RecommendRequest(user_id=p.user, k=10), timeout=5)
                p.polls += 1
                p.cold_polls += r.cold_start
                if not r.cold_start and r.state_version >= p.offset:
                    p.served = time.time()
                    p.served_version = r.state_version
                    return
            except grpc.aio.AioRpcError:
                p.polls += 1
            if p.observed_event.is_set():
                await asyncio.sleep(args.poll_ms / 1000)
            else:
                try:
                    await asyncio.wait_for(p.observed_event.wait(), timeout=args.coarse_poll_ms / 1000)
                except asyncio.TimeoutError:
                    pass

    try:
        await asyncio.wait_for(channel.channel_ready(), timeout=60)
        # Warm-up probes (not recorded): the trainer has caught up with the warm events once each is served.
        warm = [Probe(-1 - i, users[i % len(users)], PROBE_ITEM_BASE - 1 - i) for i in range(args.warm_probes)]
        t0 = time.monotonic()
        await asyncio.gather(*(run(p) for p in warm))
        unserved = [p for p in warm if p.served is None]
        if unserved:
            raise RuntimeError(f"{len(unserved)} of {len(warm)} warm-up probes were never served within "
                               f"{deadline_s:.0f} s: is the trainer keeping up?")
        result["warmup_seconds"] = time.monotonic() - t0
        print(f"warm-up: {len(warm)} probes served after {result['warmup_seconds']:.1f} s; probing "
              f"{args.probes} events at {args.probe_rate:g}/s", flush=True)

        before_t, before_s = scrape(trainer_port), scrape(server_metrics_port)
        probes = [Probe(i, users[i % len(users)], PROBE_ITEM_BASE + i) for i in range(args.probes)]
        tasks, pending = [], set()
        start = time.monotonic()
        for i, p in enumerate(probes):
            while len(pending) >= args.max_in_flight:  # bounded: a stalled pipeline stops new probes
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            wait = start + i / args.probe_rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            task = asyncio.create_task(run(p))
            tasks.append(task)
            pending.add(task)
            pending = {t for t in pending if not t.done()}
        await asyncio.gather(*tasks)
        result["probe_seconds"] = time.monotonic() - start
        after_t, after_s = scrape(trainer_port), scrape(server_metrics_port)
        stages = stage_means(before_t, after_t)
        if "total" in stages:  # the state refresh and bookkeeping have no stage of their own
            listed = sum(v["mean_ms"] for k, v in stages.items() if k not in ("total", *RECEIVE_STAGES))
            stages["refresh_and_rest"] = {"batches": stages["total"]["batches"],
                                          "mean_ms": max(0.0, stages["total"]["mean_ms"] - listed)}
        result["trainer_stages"] = stages
        result["trainer_batches"] = result["trainer_stages"].get("total", {}).get("batches", 0)
        events = counter(before_t, after_t, "liverec_trainer_events_consumed_total")
        result["trainer_events_per_batch"] = events / result["trainer_batches"] if result["trainer_batches"] else None
        result["trainer_events"] = events
        n = counter(before_s, after_s, "liverec_serving_request_seconds_count", method="Recommend", code="OK")
        s = counter(before_s, after_s, "liverec_serving_request_seconds_sum", method="Recommend", code="OK")
        result["server_requests"] = n
        result["server_request_mean_ms"] = s / n * 1000 if n else None
        result["observer_records"] = observer.records
        return probes
    finally:
        await channel.close()
        observer.close()
        producer.close()


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    return {"n": len(a), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "mean": float(a.mean())}


def run(args: argparse.Namespace) -> dict:
    from liverec.platform.broker import LocalBroker, free_ports
    from liverec.platform.config import load_config
    from liverec.platform.datasets import load_dataset
    from liverec.platform.kafka import ensure_topics, make_producer
    from liverec.platform.replay import rebase_times, replay

    table, _ = rebase_times(load_dataset(args.dataset).table)
    warm_n = min(args.warm_events, len(table) - 1)
    warm = table.slice(0, warm_n)
    users = sorted(set(warm.user_id.tolist()))
    result: dict = {}
    work = Path(tempfile.mkdtemp(prefix="liverec-bench-freshness-"))
    procs: list[subprocess.Popen] = []
    steady = None
    with LocalBroker(log_dir=work / "broker") as broker:
        base = load_config(None)
        config = dataclasses.replace(
            base, kafka=dataclasses.replace(base.kafka, bootstrap_servers=broker.bootstrap),
            trainer=dataclasses.replace(base.trainer, batch_max_ms=args.batch_max_ms, batch_events=args.batch_events,
                                        publish_every_s=args.publish_every_s))
        ensure_topics(config.kafka, config.topics)
        producer = make_producer(config.kafka)
        try:
            replay(warm, producer, config.topics.events)
        finally:
            producer.close()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LIVEREC_LOGGING__LEVEL": "WARNING",
               "LIVEREC_TRAINER__BATCH_MAX_MS": str(args.batch_max_ms),
               "LIVEREC_TRAINER__BATCH_EVENTS": str(args.batch_events),
               "LIVEREC_TRAINER__PUBLISH_EVERY_S": str(args.publish_every_s)}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        for item in args.env:
            key, _, value = item.partition("=")
            env[key] = value
        cli = [sys.executable, "-m", "liverec.platform", "--bootstrap", broker.bootstrap]
        trainer_port, grpc_port, serve_metrics = free_ports(3)
        trainer_log, server_log = work / "trainer.log", work / "server.log"
        try:
            with open(trainer_log, "wb") as out:
                procs.append(subprocess.Popen(cli + ["train", "--state-dir", str(work / "trainer"), "--metrics-port",
                                                     str(trainer_port), "--quiet"],
                                              stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env))
            with open(server_log, "wb") as out:
                procs.append(subprocess.Popen(cli + ["serve", "--port", str(grpc_port), "--state-dir",
                                                     str(work / "serving"), "--metrics-port", str(serve_metrics),
                                                     "--device", args.serving_device],
                                              stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env))
            wait_port(trainer_port, procs[0], "trainer", trainer_log)
            wait_port(grpc_port, procs[1], "server", server_log)
            wait_port(serve_metrics, procs[1], "server metrics", server_log)
            rest = table.slice(warm_n, len(table))
            steady = Steady(config, rest, args.replay_rate)
            steady.start()
            t0 = time.perf_counter()
            probes = asyncio.run(probe_phase(args, config, users, grpc_port, result, trainer_port, serve_metrics))
            result["replayed_during_run"] = steady.close()
            result["replay_seconds"] = time.perf_counter() - t0
            steady = None
        finally:
            if steady is not None:
                steady.close()
            for proc in reversed(procs):
                stop_process(proc)
        result["trainer_log_tail"] = trainer_log.read_text(errors="replace")[-1500:]
        result["server_log_tail"] = server_log.read_text(errors="replace")[-1500:]
    shutil.rmtree(work, ignore_errors=True)
    served = [p for p in probes if p.served is not None]
    ms = lambda a, b: (a - b) * 1000  # noqa: E731
    fresh = [ms(p.served, p.sent) for p in served]
    with_state = [p for p in served if p.state_created is not None]
    breakdown = {
        "ack": stats([ms(p.acked, p.sent) for p in served]),
        "trainer": stats([ms(p.state_created, p.sent) for p in with_state]),
        "delivery": stats([ms(p.state_observed, p.state_created) for p in with_state]),
        "serve": stats([ms(p.served, p.state_observed) for p in with_state]),
    }
    summary = stats(fresh)
    passed = bool(served) and len(served) == len(probes) and summary["p50"] <= TARGETS_MS["p50"] \
        and summary["p99"] <= TARGETS_MS["p99"]
    result.update({
        "probes": len(probes), "served": len(served), "timed_out": len(probes) - len(served),
        "freshness_ms": summary, "breakdown_ms": breakdown, "pass": passed,
        "polls_per_probe": float(np.mean([p.polls for p in probes])) if probes else 0.0,
        "warm_users": len(users), "warm_events": warm_n,
        "probe_records": [p.as_dict() for p in probes] if args.keep_probes else None,
    })
    return result


def print_table(r: dict) -> None:
    s = r["settings"]
    print(f"\nfreshness benchmark — {r['dataset']}, local Tansu broker, trainer + replica processes, "
          f"{r['date']}, {r['machine']}, {r['kafka_crc32c']} CRC-32C")
    print(f"  trainer batch_max_ms {s['batch_max_ms']}, batch_events {s['batch_events']}, publish_every_s "
          f"{s['publish_every_s']}; replay {s['replay_rate']:g} events/s during the run; "
          f"probes {r['probes']} at {s['probe_rate']:g}/s; polls every {s['poll_ms']:g} ms once the state is out "
          f"({s['coarse_poll_ms']:g} ms before); torch threads {s['threads'] or 'default'}; "
          f"replica device {s['serving_device']}, extra settings {' '.join(s['extra_env']) or 'none'}")
    f = r["freshness_ms"]
    if f.get("n"):
        print(f"  {'':<28}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}   target")
        print(f"  {'event → served (ms)':<28}{f['p50']:>9.1f}{f['p95']:>9.1f}{f['p99']:>9.1f}{f['max']:>9.1f}   "
              f"p50 ≤ {TARGETS_MS['p50']:.0f}, p99 ≤ {TARGETS_MS['p99']:.0f}: {'PASS' if r['pass'] else 'FAIL'}")
        names = {"ack": "  send → broker ack", "trainer": "  send → state record", "delivery": "  record → observer",
                 "serve": "  observer → served answer"}
        for key, label in names.items():
            b = r["breakdown_ms"][key]
            if b.get("n"):
                print(f"  {label:<28}{b['p50']:>9.1f}{b['p95']:>9.1f}{b['p99']:>9.1f}{b['max']:>9.1f}")
    print(f"  served {r['served']}/{r['probes']} probes ({r['timed_out']} timed out), "
          f"{r['polls_per_probe']:.1f} Recommend calls per probe")
    st = r.get("trainer_stages") or {}
    received = {k: v for k, v in st.items() if k in RECEIVE_STAGES}
    st = {k: v for k, v in st.items() if k not in RECEIVE_STAGES}
    if received:
        print("  trainer per received chunk (main thread, ms): " + ", ".join(
            f"{k} {v['mean_ms']:.1f} ({v['batches']:.0f} chunks)" for k, v in sorted(received.items())))
    if st:
        parts = ", ".join(f"{k} {v['mean_ms']:.1f}" for k, v in sorted(st.items(), key=lambda kv: -kv[1]["mean_ms"]))
        epb = r.get("trainer_events_per_batch")
        print(f"  trainer per micro-batch during probes (ms, {r['trainer_batches']:.0f} batches, "
              f"{epb:.1f} events each): {parts}" if epb else f"  trainer stages (ms): {parts}")
    if r.get("server_request_mean_ms") is not None:
        print(f"  server: {r['server_requests']:.0f} Recommend calls, mean {r['server_request_mean_ms']:.2f} ms server-side")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="liverec bench freshness", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared/data/ml-100k"))
    parser.add_argument("--probes", type=int, default=None, help="probe events (default 1,000; quick 60)")
    parser.add_argument("--probe-rate", type=float, default=20.0, help="probes started per second")
    parser.add_argument("--replay-rate", type=float, default=50.0, help="dataset events per second during the run")
    parser.add_argument("--warm-events", type=int, default=None,
                        help="events learned before probing (default 2,000; quick 300)")
    parser.add_argument("--warm-probes", type=int, default=4)
    parser.add_argument("--batch-max-ms", type=int, default=20, help="trainer.batch_max_ms (default 20)")
    parser.add_argument("--batch-events", type=int, default=256, help="trainer.batch_events")
    parser.add_argument("--publish-every-s", type=float, default=1.0, help="trainer.publish_every_s")
    parser.add_argument("--poll-ms", type=float, default=2.0, help="poll interval once the state record is out")
    parser.add_argument("--coarse-poll-ms", type=float, default=50.0, help="poll interval before that")
    parser.add_argument("--probe-timeout", type=float, default=30.0, help="seconds before a probe counts as lost")
    parser.add_argument("--max-in-flight", type=int, default=64, help="probes waiting at once, at most")
    parser.add_argument("--serving-device", default="auto", help="the replica's device (auto: cuda when present)")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS for the trainer and the replica (default 0: torch's default)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the trainer and replica processes, e.g. LIVEREC_* overrides")
    parser.add_argument("--quick", action="store_true", help="60 probes after 300 warm events (< 60 s)")
    parser.add_argument("--keep-probes", action="store_true", help="store every probe's timings in the JSON")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `liverec` sets for its processes
    if args.probes is None:
        args.probes = 60 if args.quick else 1000
    if args.warm_events is None:
        args.warm_events = 300 if args.quick else 2000
    started = time.perf_counter()
    try:
        result = run(args)
    except RuntimeError as exc:
        print(f"liverec bench freshness: {exc}", file=sys.stderr)
        return 1
    result.update({
        "benchmark": "freshness", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "kafka_crc32c": "native" if native_crc32c() else "pure-python",  # the children's environment too
        "dataset": Path(args.dataset).name, "quick": args.quick, "targets_ms": TARGETS_MS,
        "seconds": time.perf_counter() - started,
        "settings": {"batch_max_ms": args.batch_max_ms, "batch_events": args.batch_events,
                     "publish_every_s": args.publish_every_s, "replay_rate": args.replay_rate,
                     "probe_rate": args.probe_rate, "poll_ms": args.poll_ms, "coarse_poll_ms": args.coarse_poll_ms,
                     "warm_events": args.warm_events, "threads": args.threads, "probe_timeout_s": args.probe_timeout,
                     "serving_device": args.serving_device, "extra_env": args.env,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     "observer_fetch_max_wait_ms": OBSERVER_FETCH_WAIT_MS},
    })
    out = args.out or RESULTS / ("freshness-quick.json" if args.quick else "freshness.json")
    write_result(result, out, indent=1)
    print_table(result)
    print(f"wrote {out}")
    if args.json:
        print(json.dumps(result))
    return 0 if result["served"] else 1


if __name__ == "__main__":
    sys.exit(main())
