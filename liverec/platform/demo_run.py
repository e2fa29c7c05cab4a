"""The work behind `liverec demo` (see `liverec.platform.demo`): processes, threads, the live loop."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from types import FrameType
from typing import IO, Any

import numpy as np

from liverec.platform.broker import LocalBroker, _die_with_parent, free_ports
from liverec.platform.config import LiverecConfig
from liverec.platform.datasets import DatasetFormatError, EventTable, SyntheticConfig, load_dataset
from liverec.platform.demo_report import (
    HR_WINDOW,
    DemoRecord,
    measure_codec_bytes,
    popularity_prequential,
    read_bench_state,
    summary_table,
    windowed_rate,
    write_report,
)
from liverec.platform.demo_view import (
    AnswerLine,
    LiveView,
    MetricsUnavailable,
    Scrape,
    ViewState,
    bucket_delta,
    histogram_quantile,
    percentile,
    scrape,
)
from liverec.platform.kafka import ensure_topics, make_producer

REPO_ROOT = Path(__file__).resolve().parents[2]
TICK_S = 0.25
START_TIMEOUT_S = 180.0
PROBE_TIMEOUT_S = 60.0
PROBE_POLL_S = 0.02
RECENT_USERS = 256


class DemoError(RuntimeError):
    """The demo could not complete (a process died, a deadline passed); the message says which."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the demo."""


# -- child processes ------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    ports: dict[str, int]
    files: list[IO[bytes]]
    returncode: int | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        parts = []
        for path in (self.out_path, self.err_path):
            if path.exists():
                parts.append(path.read_bytes()[-n:].decode(errors="replace"))
        return "\n".join(p for p in parts if p.strip()) or "(no output)"

    def stop(self, grace_s: float) -> int:
        """SIGTERM, then SIGKILL after `grace_s`; returns the exit code (negative: the signal)."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in self.files:
            f.close()
        self.returncode = self.proc.returncode
        return self.returncode


def start_child(name: str, argv: list[str], env: dict[str, str], log_dir: Path, ports: dict[str, int],
                config_file: str | None) -> Child:
    """`python -m liverec.platform [--config F] ARGV` with stdout/stderr to files in `log_dir`.

    Its own session (a terminal's Ctrl-C reaches only the demo, which stops it in order) and
    PR_SET_PDEATHSIG (it gets SIGTERM if the demo dies without cleaning up).
    """
    out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.log"
    out, err = open(out_path, "wb"), open(err_path, "wb")
    cmd = [sys.executable, "-m", "liverec.platform", *(["--config", config_file] if config_file else []), *argv]
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_die_with_parent, start_new_session=True, cwd=os.getcwd())
    except BaseException:
        out.close()
        err.close()
        raise
    return Child(name, proc, out_path, err_path, ports, [out, err])


def port_listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is gone for every practical purpose once reaped.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# -- the stream -------------------------------------------------------------------------------------------


def load_stream(args: argparse.Namespace) -> tuple[EventTable, str, str]:
    """The events to replay, a short name and a note on what they are."""
    if args.dataset == "synthetic":
        cfg = SyntheticConfig(num_users=args.users, num_items=args.items, num_events=args.events, seed=args.seed)
        table = load_dataset("synthetic", synthetic_config=cfg).table
        note = (f"seeded generator: {cfg.num_events:,} events, {table.num_users():,} users, {table.num_items():,} items, "
                f"seed {cfg.seed}; power-law popularity, sessions with item chains, drifting tastes, new items")
        return table, "synthetic", note
    table = load_dataset(args.dataset, format=args.format).table
    full = len(table)
    if args.events < full:
        table = table.slice(0, args.events)
    note = (f"{len(table):,} of {full:,} events in time order, {table.num_users():,} users, "
            f"{table.num_items():,} items")
    return table, str(args.dataset), note


# -- the demo ---------------------------------------------------------------------------------------------


class Demo:
    def __init__(self, config: LiverecConfig, args: argparse.Namespace) -> None:
        self.config = config
        self.args = args
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.rng = random.Random(args.seed)
        self.children: dict[str, Child] = {}
        # produced by the replay thread
        self.produced = 0
        self.replay_done = threading.Event()
        self.replay_started = 0.0
        self.replay_finished = 0.0
        self.recent_users: deque[int] = deque(maxlen=RECENT_USERS)
        self.latest_offset: dict[int, int] = {}
        # produced by the Recommend and probe threads
        self.recommends: list[dict[str, Any]] = []
        self.answers: deque[AnswerLine] = deque(maxlen=16)
        self.probes: list[dict[str, Any]] = []
        self.probes_done = threading.Event()
        self.applied = 0.0  # the trainer's applied events, as last scraped
        self.serving_up = threading.Event()

    # -- threads ---------------------------------------------------------------------------------------

    def _delivered(self, user: int, metadata: Any) -> None:
        if metadata.offset > self.latest_offset.get(user, -1):
            self.latest_offset[user] = metadata.offset

    def _failed(self, exc: BaseException) -> None:
        self.errors.append(f"replay: an event was not delivered: {exc!r}")

    def replay(self, table: EventTable) -> None:
        from liverec.platform.events import encode_event, event_key

        topic = self.config.topics.events
        producer = make_producer(self.config.kafka)
        rate = self.args.rate
        users, items = table.user_id.tolist(), table.item_id.tolist()
        actions, values = table.action.tolist(), table.value.tolist()
        try:
            self.replay_started = time.monotonic()
            for i, (user, item, action, value) in enumerate(zip(users, items, actions, values)):
                if self.stop.is_set():
                    break
                if rate is not None:
                    ahead = self.replay_started + i / rate - time.monotonic()
                    if ahead > 0.002 and self.stop.wait(ahead):
                        break
                now_ms = int(time.time() * 1000)
                future = producer.send(topic, key=event_key(user), value=encode_event(user, item, action, value, now_ms))
                future.add_callback(self._delivered, user)
                future.add_errback(self._failed)
                self.produced = i + 1
                self.recent_users.append(user)
            producer.flush()
        except Exception as exc:  # noqa: BLE001 - reported by the main loop
            self.errors.append(f"replay: {type(exc).__name__}: {exc}")
        finally:
            producer.close(timeout=5)
            self.replay_finished = time.monotonic()
            self.replay_done.set()

    def _wait_serving(self, client: Any) -> bool:
        import grpc

        while not self.stop.is_set():
            try:
                if client.health(timeout=1.0) == "SERVING":
                    self.serving_up.set()
                    return True
            except grpc.RpcError:
                pass
            self.stop.wait(0.25)
        return False

    def recommend_loop(self, target: str) -> None:
        import grpc

        from liverec.serving.client import RecommenderClient

        if self.args.recommend_rate <= 0:
            return
        interval = 1.0 / self.args.recommend_rate
        with RecommenderClient(target) as client:
            if not self._wait_serving(client):
                return
            next_at = time.monotonic()
            while not self.stop.is_set():
                if self.recent_users:
                    user = self.rng.choice(list(self.recent_users))
                    latest = self.latest_offset.get(user)
                    started = time.perf_counter()
                    t = time.monotonic()
                    try:
                        rec = client.recommend(user, k=10, exclude_seen=True, timeout=5.0)
                    except grpc.RpcError as err:
                        self.recommends.append({"t": t, "code": err.code().name, "latency_ms":
                                                1000 * (time.perf_counter() - started), "cold_start": False,
                                                "staleness_ms": None})
                    else:
                        ms = 1000 * (time.perf_counter() - started)
                        self.recommends.append({"t": t, "code": "OK", "latency_ms": ms, "cold_start": rec.cold_start,
                                                "staleness_ms": rec.staleness_ms, "state_version": rec.state_version,
                                                "streaming": not self.replay_done.is_set(),
                                                "has_latest": latest is not None and rec.state_version >= latest})
                        self.answers.append(AnswerLine(user, rec.item_ids, rec.state_version, rec.model_version,
                                                       rec.staleness_ms, rec.cold_start, ms, latest))
                next_at += interval
                delay = next_at - time.monotonic()
                if delay < -1.0:  # fell far behind (a slow machine): do not burst to catch up
                    next_at = time.monotonic()
                elif delay > 0 and self.stop.wait(delay):
                    break

    def probe_loop(self, target: str, table: EventTable) -> None:
        """Freshness probes spread over the stream (the rest right after it): one at a time."""
        import grpc

        from liverec.platform.events import encode_event, event_key
        from liverec.serving.client import RecommenderClient
        from liverec.v1 import events_pb2

        count = max(0, self.args.probes)
        if count == 0:
            self.probes_done.set()
            return
        rate = self.args.rate
        planned = len(table) / rate if rate else 0.0
        interval = planned / (count + 1)
        item_pool = np.unique(table.item_id).tolist()
        producer = make_producer(self.config.kafka, linger_ms=0)
        try:
            with RecommenderClient(target) as client:
                if not self._wait_serving(client):
                    return
                while not self.replay_started and not self.stop.is_set():
                    self.stop.wait(0.05)
                for i in range(count):
                    due = self.replay_started + (i + 1) * interval
                    while time.monotonic() < due and not self.replay_done.is_set() and not self.stop.is_set():
                        self.stop.wait(min(0.1, max(0.0, due - time.monotonic())))
                    if self.stop.is_set():
                        return
                    users = [u for u in list(self.recent_users) if u in self.latest_offset] or list(self.latest_offset)
                    if not users:  # nothing delivered yet: wait for the stream
                        self.stop.wait(0.2)
                        users = list(self.latest_offset) or [int(table.user_id[0])]
                    user = self.rng.choice(users)
                    item = self.rng.choice(item_pool)
                    phase = "after the stream" if self.replay_done.is_set() else "during the stream"
                    sent = time.monotonic()
                    value = encode_event(user, item, events_pb2.ACTION_CLICK, float("nan"), int(time.time() * 1000))
                    md = producer.send(self.config.topics.events, key=event_key(user), value=value).get(timeout=30)
                    acked = time.monotonic()
                    self._delivered(user, md)
                    probe: dict[str, Any] = {"user_id": user, "item_id": item, "partition": md.partition,
                                             "offset": md.offset, "sent_at_s": sent - self.replay_started,
                                             "ack_s": acked - sent, "phase": phase, "freshness_s": None}
                    self.probes.append(probe)
                    # The clock for giving up starts once the trainer has applied everything produced up
                    # to the probe: while it is behind, a long wait is the honest answer, not a failure.
                    produced_before = self.produced + len(self.probes)
                    deadline = math.inf
                    while not self.stop.is_set():
                        now = time.monotonic()
                        if deadline == math.inf and self.applied >= produced_before:
                            deadline = now + PROBE_TIMEOUT_S
                        if now > deadline:
                            break
                        try:
                            rec = client.recommend(user, k=10, timeout=2.0)
                        except grpc.RpcError:
                            rec = None
                        if rec is not None and not rec.cold_start and rec.state_version >= md.offset:
                            probe["freshness_s"] = time.monotonic() - sent
                            probe["staleness_ms"] = rec.staleness_ms
                            probe["state_version"] = rec.state_version
                            break
                        # 20 ms at first, then ~5% of the time waited so far: fine resolution without
                        # flooding the replica while the trainer is behind
                        self.stop.wait(min(0.25, max(PROBE_POLL_S, 0.05 * (time.monotonic() - sent))))
        except Exception as exc:  # noqa: BLE001 - reported by the main loop
            self.errors.append(f"probes: {type(exc).__name__}: {exc}")
        finally:
            producer.close(timeout=5)
            self.probes_done.set()


def _handle_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run(config: LiverecConfig, args: argparse.Namespace) -> int:
    """`liverec demo`: 0 when every event was learned and every probe seen, 1 on failure, 130 on interrupt."""
    previous = {sig: signal.signal(sig, _handle_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    quiet = logging.getLogger("liverec")
    level = quiet.level
    if config.logging.level != "DEBUG":  # the view says what matters; the children's logs go to files
        quiet.setLevel(logging.WARNING)
    try:
        return _run(config, args)
    except Interrupted as why:
        print(f"\nliverec demo: interrupted ({why}); every process it started has been stopped", flush=True)
        return 130
    finally:
        quiet.setLevel(level)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_signals() -> None:
    """While stopping the processes: a second Ctrl-C must not cut the clean-up short."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _run(config: LiverecConfig, args: argparse.Namespace) -> int:
    started_wall = time.monotonic()
    started_at = dt.datetime.now().astimezone()
    codec = args.codec or config.state.codec
    if args.codec:
        try:
            config = dataclasses.replace(config, state=dataclasses.replace(config.state, codec=args.codec, params={}))
        except ValueError as exc:
            print(f"liverec demo: --codec: {exc}", file=sys.stderr)
            return 2
    try:
        table, dataset_name, dataset_note = load_stream(args)
    except (DatasetFormatError, FileNotFoundError, ValueError) as exc:
        print(f"liverec demo: {exc}", file=sys.stderr)
        return 2
    report_dir = Path(args.report_dir or f"runs/demo-{started_at:%Y%m%d-%H%M%S}")
    report_dir.mkdir(parents=True, exist_ok=True)
    log_dir = report_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    view = LiveView(mode=args.view)
    say = view.message
    say(f"liverec demo: {len(table):,} events from {dataset_name}; report → {report_dir}/")
    pop_scored, pop_hits = popularity_prequential(table.user_id, table.item_id, config.trainer.batch_events)

    record = DemoRecord(
        started_at=started_at.isoformat(timespec="seconds"),
        command="liverec " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "liverec demo",
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        dataset=dataset_name, dataset_note=dataset_note, rate=args.rate, batch_events=config.trainer.batch_events,
        model=dataclasses.asdict(config.model.encoder), codec=codec, pop_scored=pop_scored, pop_hits=pop_hits,
    )
    record.load_average["start"] = list(os.getloadavg())
    demo = Demo(config, args)
    threads: list[threading.Thread] = []
    workdir = tempfile.TemporaryDirectory(prefix="liverec-demo-")
    broker = LocalBroker()
    ok = False
    try:
        # The broker is started with SIGINT blocked (the mask is inherited across exec): a terminal's
        # Ctrl-C reaches the whole foreground process group, and Tansu would exit on it at once,
        # before the trainer's last checkpoint. The demo stops it last, with SIGTERM.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            broker.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        record.processes["broker"] = {"pid": broker.pid, "ports": {"kafka": broker.port}}
        config = dataclasses.replace(config, kafka=dataclasses.replace(config.kafka, bootstrap_servers=broker.bootstrap))
        demo.config = config
        created = ensure_topics(config.kafka, config.topics)
        say(f"broker  Tansu on {broker.bootstrap} (pid {broker.pid}); topics: {', '.join(created)}")

        env = {**os.environ, "LIVEREC_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap, "PYTHONUNBUFFERED": "1"}
        env.setdefault("LIVEREC_SERVING__DRAIN_S", "2")
        if args.codec:
            env["LIVEREC_STATE__CODEC"] = args.codec
        # One intra-op thread each: the trainer, the replica, the broker and this process share the
        # machine, and OpenMP teams of several threads on oversubscribed cores spin and stall.
        env.setdefault("OMP_NUM_THREADS", "1")
        work = Path(workdir.name)
        t_metrics, s_port, s_metrics = free_ports(3)
        trainer = start_child("trainer", ["train", "--state-dir", str(work / "trainer"), "--metrics-port",
                                          str(t_metrics), "--quiet"], env, log_dir, {"metrics": t_metrics}, args.config)
        demo.children["trainer"] = trainer
        serving = start_child("serving", ["serve", "--port", str(s_port), "--state-dir", str(work / "serving"),
                                          "--metrics-port", str(s_metrics), "--device", args.device],
                              env, log_dir, {"grpc": s_port, "metrics": s_metrics}, args.config)
        demo.children["serving"] = serving
        for child in (trainer, serving):
            record.processes[child.name] = {"pid": child.proc.pid, "ports": dict(child.ports)}
        _wait_up(demo, [(trainer, t_metrics), (serving, s_metrics)], view)
        target = f"127.0.0.1:{s_port}"
        say(f"trainer pid {trainer.proc.pid}, metrics http://127.0.0.1:{t_metrics}/metrics · "
            f"serving pid {serving.proc.pid}, gRPC {target}, metrics http://127.0.0.1:{s_metrics}/metrics")

        threads = [threading.Thread(target=demo.replay, args=(table,), name="demo-replay", daemon=True),
                   threading.Thread(target=demo.recommend_loop, args=(target,), name="demo-recommend", daemon=True),
                   threading.Thread(target=demo.probe_loop, args=(target, table), name="demo-probes", daemon=True)]
        for t in threads:
            t.start()
        serving_last = _watch(demo, record, view, table, t_metrics, s_metrics, started_wall)
        record.stream_s = (demo.replay_finished or time.monotonic()) - demo.replay_started
        ok = True
    except DemoError as exc:
        say(f"liverec demo: failed: {exc}")
    finally:
        _ignore_signals()
        demo.stop.set()
        for t in threads:
            t.join(timeout=10)
        if any(c.alive() for c in demo.children.values()) or broker.pid:
            say("stopping: trainer, serving replica, broker …")
        summary = _stop_all(demo, broker, record, log_dir)
        workdir.cleanup()
        signal.signal(signal.SIGINT, _handle_signal)
        signal.signal(signal.SIGTERM, _handle_signal)
    view.close()

    if not ok:
        return 1
    record.trainer_summary = summary
    record.replayed = demo.produced
    record.probes_sent = len(demo.probes)
    record.recommends = demo.recommends
    record.probes = demo.probes
    record.answers = [dataclasses.asdict(a) for a in demo.answers]
    record.server_latency_buckets = serving_last.buckets("liverec_serving_request_seconds", method="Recommend",
                                                         code="OK") if serving_last else []
    histories = _sample_histories(table, config.model.encoder.max_len, args.seed)
    record.codec_bytes = measure_codec_bytes(config.model, histories, {codec: dict(config.state.params)})
    record.bench_state = read_bench_state(REPO_ROOT / "benchmarks" / "results" / "state.json")
    record.load_average["end"] = list(os.getloadavg())
    record.wall_s = time.monotonic() - started_wall
    path = write_report(record, report_dir)
    failures = _failures(record, demo)
    print("\nliverec demo — summary\n" + summary_table(record), flush=True)
    print(f"\nreport: {path} (plots, report.json and the processes' logs in {report_dir}/)", flush=True)
    for failure in failures:
        print(f"liverec demo: {failure}", flush=True)
    return 1 if failures else 0


def _failures(record: DemoRecord, demo: Demo) -> list[str]:
    f = record.figures()
    out = list(demo.errors)
    if f["events_applied"] != f["events_produced"]:
        out.append(f"the trainer applied {f['events_applied']} events, {f['events_produced']} were produced")
    missing = [p for p in record.probes if p.get("freshness_s") is None]
    if missing:
        out.append(f"{len(missing)} freshness probe(s) never showed up in a Recommend answer "
                   f"(given up {PROBE_TIMEOUT_S:g} s after the trainer had applied them)")
    if record.shutdown.get("left"):
        out.append(f"left behind: {record.shutdown['left']}")
    return out


def _wait_up(demo: Demo, endpoints: list[tuple[Child, int]], view: LiveView) -> None:
    """Until every child answers on its /metrics port; a child that exits first is an error."""
    deadline = time.monotonic() + START_TIMEOUT_S
    waiting = dict(endpoints)
    state = ViewState(phase="starting the trainer and the serving replica")
    t0 = time.monotonic()
    while waiting:
        for child, port in list(waiting.items()):
            if not child.alive():
                raise DemoError(f"{child.name} exited with code {child.proc.returncode} while starting:\n"
                                f"{child.log_tail()}")
            try:
                scrape(port, timeout_s=0.5)
                del waiting[child]
            except MetricsUnavailable:
                pass
        if time.monotonic() > deadline:
            raise DemoError(f"{', '.join(c.name for c in waiting)} did not come up within {START_TIMEOUT_S:g} s")
        state.elapsed_s = time.monotonic() - t0
        view.update(state)
        time.sleep(TICK_S)


def _watch(demo: Demo, record: DemoRecord, view: LiveView, table: EventTable, t_port: int, s_port: int,
           started: float) -> Scrape | None:
    """The live loop: scrape, record a tick, redraw; until every event is learned and every probe done."""
    state = ViewState(to_produce=len(table), rate=demo.args.rate, probes_total=max(0, demo.args.probes))
    ticks: deque[tuple[float, float]] = deque(maxlen=int(2 / TICK_S) + 1)  # (t, applied) for events/s
    serving_history: deque[Scrape] = deque(maxlen=int(5 / TICK_S) + 1)  # for a recent p99
    trainer_last: Scrape | None = None
    serving_last: Scrape | None = None
    drained_since: float | None = None
    last_progress = time.monotonic()
    last_applied = -1.0
    while True:
        for child in demo.children.values():
            if not child.alive():
                raise DemoError(f"the {child.name} process exited with code {child.proc.returncode}:\n{child.log_tail()}")
        if demo.errors:
            raise DemoError("; ".join(demo.errors))
        try:
            trainer_last = scrape(t_port)
        except MetricsUnavailable:
            pass
        try:
            serving_last = scrape(s_port)
            serving_history.append(serving_last)
        except MetricsUnavailable:
            pass
        now = time.monotonic()
        produced_total = demo.produced + len(demo.probes)
        state.elapsed_s = now - started
        state.produced = demo.produced
        if trainer_last is not None:
            t = trainer_last
            applied = t.value("liverec_trainer_events_applied_total")
            ticks.append((now, applied))
            state.applied = applied
            demo.applied = applied
            if len(ticks) > 1 and ticks[-1][0] > ticks[0][0]:
                state.events_per_s = (ticks[-1][1] - ticks[0][1]) / (ticks[-1][0] - ticks[0][0])
            state.loss = t.value("liverec_trainer_loss")
            state.hr10 = t.value("liverec_trainer_prequential_hr10")
            state.lag = t.value("liverec_trainer_consumer_lag")
            state.refreshes = t.value("liverec_trainer_state_refreshes_total")
            state.dead_lettered = t.value("liverec_trainer_events_dead_lettered_total", 0.0)
            state.model_version = t.value("liverec_trainer_model_version")
            # popularity over the same recent window of the stream (by replayed events applied)
            state.pop_hr10 = windowed_rate(record.pop_scored, record.pop_hits, int(min(applied, len(table))), HR_WINDOW)
            record.ticks.append({"t": now, "produced": produced_total, "applied": applied,
                                 "scored": t.value("liverec_trainer_prequential_scored_total"),
                                 "hits": t.value("liverec_trainer_prequential_hits_at10_total"),
                                 "hr10_recent": state.hr10, "loss": state.loss, "lag": state.lag,
                                 "refreshes": state.refreshes, "model_version": state.model_version,
                                 "serving_version": math.nan, "server_p99_ms": math.nan})
            if applied != last_applied:
                last_applied, last_progress = applied, now
            record.trainer_stages = {ls["stage"]: v for ls, v in t.series("liverec_trainer_batch_seconds_sum")}
            record.ticks[-1]["replay_done"] = demo.replay_done.is_set()
        if serving_last is not None:
            s = serving_last
            state.serving_version = s.value("liverec_serving_params_version")
            state.serving_ready = s.value("liverec_serving_ready")
            old = serving_history[0]
            name = "liverec_serving_request_seconds"
            recent = bucket_delta(s.buckets(name, method="Recommend", code="OK"),
                                  old.buckets(name, method="Recommend", code="OK")) if old is not s else []
            p99 = histogram_quantile(0.99, recent) if recent and recent[-1][1] > 0 else \
                histogram_quantile(0.99, s.buckets(name, method="Recommend", code="OK"))
            state.server_p99_ms = 1000 * p99
            if record.ticks:
                record.ticks[-1]["serving_version"] = state.serving_version
                record.ticks[-1]["server_p99_ms"] = state.server_p99_ms
        recent_calls = [r["latency_ms"] for r in demo.recommends[-200:] if r["code"] == "OK" and r["t"] > now - 5]
        state.client_p99_ms = percentile(recent_calls, 0.99)
        state.recommends_ok = sum(1 for r in demo.recommends if r["code"] == "OK")
        state.recommends_failed = len(demo.recommends) - state.recommends_ok
        fresh = [p["freshness_s"] for p in demo.probes if p.get("freshness_s") is not None]
        state.probes_done = len(fresh)
        state.freshness_p50_s = percentile(fresh, 0.5)
        state.last_freshness_s = fresh[-1] if fresh else math.nan
        latest_per_user: dict[int, AnswerLine] = {}
        for a in list(demo.answers):  # the newest answer of each user, warm ones first
            latest_per_user.pop(a.user_id, None)
            latest_per_user[a.user_id] = a
        answers = list(latest_per_user.values())
        state.answers = ([a for a in answers if a.cold_start] + [a for a in answers if not a.cold_start])[-3:]
        if not demo.serving_up.is_set():
            state.phase = "waiting for the first model on the serving replica"
        elif not demo.replay_done.is_set():
            state.phase = "streaming"
        elif not demo.probes_done.is_set():
            state.phase = "stream done, last freshness probes"
        else:
            state.phase = "stream done, trainer catching up"
        caught_up = demo.replay_done.is_set() and demo.probes_done.is_set() and state.applied >= produced_total
        view.update(state, force=caught_up)
        if caught_up:
            # one more tick once caught up, so the last refreshes and answers are in the record
            if drained_since is None:
                drained_since = now
            elif now - drained_since >= 1.0:
                return serving_last
        if demo.replay_done.is_set() and now - last_progress > max(60.0, 3 * PROBE_TIMEOUT_S):
            raise DemoError(f"the trainer stopped making progress at {state.applied:,.0f} of {produced_total:,} events")
        time.sleep(TICK_S)


def _stop_all(demo: Demo, broker: LocalBroker, record: DemoRecord, log_dir: Path) -> dict[str, Any]:
    """Trainer first (its final checkpoint and summary need the broker), then serving, then the broker;
    then check that no process is alive and no port is listening. Returns the trainer's summary."""
    summary: dict[str, Any] = {}
    codes: dict[str, int | None] = {}
    interrupted = not demo.replay_done.is_set() or not demo.probes_done.is_set()
    broker_up = broker.pid is not None and pid_alive(broker.pid)
    trainer = demo.children.get("trainer")
    if trainer is not None:
        # Its final checkpoint is local, but its last publish needs the broker: without one, waiting is pointless.
        codes["trainer"] = trainer.stop(grace_s=(20.0 if interrupted else 90.0) if broker_up else 3.0)
        for line in reversed(trainer.out_path.read_text(errors="replace").splitlines()):
            if line.startswith("{"):
                try:
                    summary = json.loads(line)
                except ValueError:
                    pass
                break
    serving = demo.children.get("serving")
    if serving is not None:
        codes["serving"] = serving.stop(grace_s=15.0)
    broker_pid = broker.pid
    broker.stop()
    left = []
    for name, info in record.processes.items():
        pid = info.get("pid")
        if pid is not None and pid_alive(pid):
            left.append(f"{name} pid {pid}")
        for kind, port in info.get("ports", {}).items():
            if port_listening(port):
                left.append(f"{name} {kind} port {port} still listening")
    record.shutdown = {
        "exit_codes": codes, "broker_pid": broker_pid, "left": left,
        "summary": ("every process stopped ("
                    + ", ".join(f"{n} exit {c}" for n, c in codes.items())
                    + (", broker" if broker_pid else "") + "); no port left listening") if not left
        else "LEFT BEHIND: " + "; ".join(left),
    }
    (log_dir / "shutdown.json").write_text(json.dumps({**record.shutdown, "processes": record.processes}, indent=1) + "\n")
    return summary


def _sample_histories(table: EventTable, max_len: int, seed: int, users: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """The last `max_len` events (items, actions) of up to `users` of the stream's users."""
    seq = table.per_user_sequences()
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(seq), size=min(users, len(seq)), replace=False)
    out = []
    for u in sorted(pick.tolist()):
        start, stop = int(seq.indptr[u]), int(seq.indptr[u + 1])
        start = max(start, stop - max_len)
        out.append((seq.item_id[start:stop], seq.action[start:stop]))
    return out
