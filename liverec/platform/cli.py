"""The `liverec` command line: one entry point for every process of the platform.

Heavy imports (torch, kafka clients) happen inside the subcommands, so `liverec --help` and
`liverec broker` start fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from liverec.platform.config import ConfigError, LiverecConfig, load_config
from liverec.platform.replay import parse_rate
from liverec.platform.state_dir import StateDirInUse

log = logging.getLogger("liverec")

BENCHMARKS = ("ingest", "store", "store_gpu", "train", "model_step", "state", "serve", "freshness", "startup")


def _config(args: argparse.Namespace) -> LiverecConfig:
    config = load_config(args.config)
    if args.bootstrap:
        config = dataclasses.replace(config, kafka=dataclasses.replace(config.kafka, bootstrap_servers=args.bootstrap))
    return config


def _stop_event_on_signals() -> threading.Event:
    """An event set by SIGINT/SIGTERM, so long-running commands can stop cleanly."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def cmd_broker(args: argparse.Namespace) -> int:
    from liverec.platform.broker import LocalBroker

    stop = _stop_event_on_signals()
    with LocalBroker(port=args.port) as broker:
        print(f"bootstrap_servers={broker.bootstrap}", flush=True)
        stop.wait()
    print("broker stopped", flush=True)
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from liverec.platform.kafka import ensure_topics

    config = _config(args)
    created = ensure_topics(config.kafka, config.topics)
    print(json.dumps({"created": created}))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from liverec.platform.datasets import (
        DatasetFormatError,
        SyntheticConfig,
        load_dataset,
    )
    from liverec.platform.kafka import ensure_topics, make_producer
    from liverec.platform.replay import rebase_times, replay

    config = _config(args)
    try:
        result = load_dataset(args.dataset, format=args.format, lenient=args.lenient,
                              synthetic_config=SyntheticConfig(seed=args.seed) if args.seed is not None else None)
    except (DatasetFormatError, FileNotFoundError) as exc:
        print(f"liverec replay: {exc}", file=sys.stderr)
        return 2
    table, shift_ms = (result.table, 0) if args.no_rebase else rebase_times(result.table)
    topic = args.topic or config.topics.events
    ensure_topics(config.kafka, config.topics)
    producer = make_producer(config.kafka)
    try:
        report = replay(table, producer, topic, rate=args.rate, limit=args.limit, progress=not args.quiet)
    finally:
        producer.close()
    summary = {
        "topic": report.topic, "events": report.events, "bytes": report.bytes,
        "seconds": round(report.seconds, 3), "events_per_s": round(report.events_per_s, 1),
        "skipped_lines": result.skipped, "time_shift_ms": shift_ms,
    }
    print(json.dumps(summary))
    return 0


def _trainer_config(args: argparse.Namespace) -> LiverecConfig:
    config = _config(args)
    changes = {}
    if args.state_dir:
        changes["state_dir"] = args.state_dir
    if args.deterministic:
        changes["deterministic"] = True
    if args.metrics_port is not None:
        changes["metrics_port"] = args.metrics_port
    return dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, **changes)) if changes else config


def cmd_train(args: argparse.Namespace) -> int:
    from liverec.trainer.progress import TrainingProgress
    from liverec.trainer.worker import TrainerWorker

    stop = _stop_event_on_signals()
    try:
        worker = TrainerWorker(_trainer_config(args), stop=stop)
    except StateDirInUse as exc:
        print(f"liverec train: {exc}", file=sys.stderr)
        return 1
    with TrainingProgress(worker, enabled=not args.quiet):
        counters = worker.run(max_events=args.max_events, idle_exit_s=args.idle_exit)
    print(json.dumps({"consumed": counters.consumed, "applied": counters.applied,
                      "dead_lettered": counters.dead_lettered, "offsets": worker.offsets,
                      "metrics_port": worker.metrics_port, **worker.online_metrics()}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from liverec.serving.process import run_serve

    config = _config(args)
    changes = {k: v for k, v in (("port", args.port), ("state_dir", args.state_dir),
                                 ("metrics_port", args.metrics_port), ("device", args.device),
                                 ("workers", args.workers)) if v is not None}
    if changes:
        config = dataclasses.replace(config, serving=dataclasses.replace(config.serving, **changes))
    return run_serve(config)


def cmd_recommend(args: argparse.Namespace) -> int:
    from liverec.serving import client

    return int(client.main(args.rest, config=_config(args)))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from liverec.trainer import evaluate

    return int(evaluate.main(args.rest, config=_config(args)))


def cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"benchmarks.{args.name}")
    return int(module.main(args.rest))


def cmd_demo(args: argparse.Namespace) -> int:
    from liverec.platform.demo import run_demo

    return run_demo(_config(args), args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liverec", description="Online-training recommendation platform.")
    parser.add_argument("--config", help="YAML or TOML configuration file (LIVEREC_* variables override it)")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (overrides kafka.bootstrap_servers)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="run the local Kafka-protocol broker (Tansu) on 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="port to listen on (default: a free one)")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("topics", help="create the liverec topics that are missing (idempotent)")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("replay", help="publish a dataset to Kafka in event-time order")
    p.add_argument("--dataset", default="synthetic", help="'synthetic' (default), a file, or a directory")
    p.add_argument("--format", choices=("recbole", "movielens", "sequence"), help="file format (default: detected)")
    p.add_argument("--lenient", action="store_true", help="skip and count malformed lines instead of failing")
    p.add_argument("--rate", type=parse_rate, default=None, help="events per second, or 'max' (default)")
    p.add_argument("--limit", type=int, default=None, help="publish at most this many events")
    p.add_argument("--topic", default=None, help="target topic (default: topics.events)")
    p.add_argument("--seed", type=int, default=None, help="seed of the synthetic generator")
    p.add_argument("--no-rebase", action="store_true",
                   help="keep original timestamps even if they predate 2000 (the trainer will dead-letter them)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("train", help="run the online trainer on the events topic")
    p.add_argument("--state-dir", help="checkpoints and RocksDB live here (default: trainer.state_dir)")
    p.add_argument("--deterministic", action="store_true", help="cut batches by offsets: bit-identical replays")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port on 127.0.0.1 (0: any free)")
    p.add_argument("--max-events", type=int, default=None, help="stop after consuming this many records")
    p.add_argument("--idle-exit", type=float, default=None,
                   help="stop after this many seconds without new events, once caught up with the log")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("serve", help="run a serving replica: gRPC Recommend from the trainer's state and params")
    p.add_argument("--port", type=int, default=None, help="gRPC port on serving.host (0: any free)")
    p.add_argument("--state-dir", default=None, help="the replica's RocksDB (default: serving.state_dir)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (0: any free, -1: none)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda[:N]")
    p.add_argument("--workers", type=int, default=None,
                   help="replica processes sharing the port (default: serving.workers; > 1 needs --port)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("recommend", help="ask a serving replica for a user's top-k", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="USER [--k N] [--target HOST:PORT] [--json] ...")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("evaluate", help="leave-one-out evaluation: online pass vs offline training vs popularity",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="--dataset PATH [--format F] --protocol full|sampled100 ...")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="run a benchmark (prints a table, writes benchmarks/results/NAME.json)")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="run the platform end to end on this machine, with a report")
    from liverec.platform.demo import add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: idle OpenMP threads spin by default, which on a shared or small
    # machine turns a 30 ms training step into a second (measured by benchmarks/store.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    # bench, evaluate and recommend pass their arguments through to their own parsers.
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "rest"):
        args.rest = extra + args.rest
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"liverec: configuration error: {exc}", file=sys.stderr)
        return 2
    from liverec.platform.log import configure_logging

    configure_logging(config.logging)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"liverec: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
