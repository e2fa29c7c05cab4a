"""`liverec serve`: one serving replica process — replica + scorer + gRPC server, until signalled."""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Gauge

from liverec.model.codecs.base import StateCodec
from liverec.model.codecs.registry import codec_from_config
from liverec.platform.config import ConfigError, LiverecConfig
from liverec.platform.state_dir import StateDirInUse
from liverec.serving.backend import Answer, ModelSnapshot, Query, Scorer
from liverec.serving.replica import Replica, resolve_device
from liverec.serving.service import build_server, serve_until_signalled
from liverec.serving.states import CodecStates, StateMetrics

log = logging.getLogger(__name__)


class ReplicaBackend:
    """What the gRPC layer needs, from a replica and a scorer."""

    def __init__(self, replica: Replica, scorer: Scorer) -> None:
        self.replica = replica
        self.scorer = scorer

    def snapshot(self) -> ModelSnapshot | None:
        return self.replica.snapshot()

    def recommend(self, snapshot: ModelSnapshot, queries: list[Query]) -> list[Answer]:
        return self.scorer.recommend(snapshot, queries)

    def ready(self) -> bool:
        return self.replica.ready()


def build_replica(config: LiverecConfig, registry: CollectorRegistry) -> tuple[Replica, ReplicaBackend]:
    def make_codec() -> StateCodec:
        return codec_from_config(config.state.codec, config.model, **config.state.params)

    states = CodecStates(make_codec(), StateMetrics(registry), make_codec=make_codec,
                         generations_kept=config.state.codec_generations_kept,
                         device=resolve_device(config.serving.device))
    replica = Replica(config, states, on_codec_params=states.install)
    version = Gauge("liverec_serving_params_version", "Parameter version being served.", registry=registry)
    ready = Gauge("liverec_serving_ready", "1 when caught up and serving.", registry=registry)
    lag = Gauge("liverec_serving_params_version_lag", "Changelog records not yet applied (params + state).",
                registry=registry)
    scorer = Scorer(replica)

    def on_snapshot(snap: ModelSnapshot) -> None:
        version.set(snap.version)
        # On CUDA: capture the full-catalog graphs for every batch size now, on the replica's
        # thread, so no request waits for a capture (later versions reuse them: a no-op).
        scorer.warm(snap, config.serving.max_batch)

    replica.on_snapshot = on_snapshot
    ready.set_function(lambda: float(replica.ready()))
    lag.set_function(lambda: float(sum(replica.lag().values())))
    if replica.snapshot() is not None:
        on_snapshot(replica.snapshot())
    return replica, ReplicaBackend(replica, scorer)


def run_serve(config: LiverecConfig, worker: int | None = None) -> int:
    """One replica until signalled; with `serving.workers` > 1 and no `worker` index, the
    supervisor of that many (each worker process calls this with its index)."""
    if config.serving.workers > 1 and worker is None:
        return supervise_workers(config)
    if resolve_device(config.serving.device).type == "cuda":
        # The host side of a batch is a few small tensor ops: a pool of threads per op costs
        # more than it saves (~200 µs per op with 16 threads on the H200 host).
        torch.set_num_threads(1)
    registry = CollectorRegistry()
    try:
        replica, backend = build_replica(config, registry)
    except StateDirInUse as exc:
        print(f"liverec serve: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # here too, for the workers' processes
        print(f"liverec serve: configuration error: {exc}", file=sys.stderr)
        return 2
    server, port = build_server(config.serving, backend, registry)
    replica.start()
    server.start()
    gc.freeze()  # start-up objects leave the collector's generations: shorter pauses under load
    print(f"serving liverec.v1.Recommender on {config.serving.host}:{port} (device {replica.device})", flush=True)
    try:
        serve_until_signalled(server)
    finally:
        replica.stop()
    return 0


def worker_config(config: LiverecConfig, index: int) -> LiverecConfig:
    """Worker `index` of a multi-worker replica: the shared port, its own state and /metrics."""
    s = config.serving
    metrics_port = s.metrics_port + index if s.metrics_port > 0 else s.metrics_port
    return dataclasses.replace(config, serving=dataclasses.replace(
        s, state_dir=str(Path(s.state_dir) / f"worker-{index}"), metrics_port=metrics_port))


def _run_worker(config: LiverecConfig, index: int) -> None:
    from liverec.platform.log import configure_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into one SIGTERM each
    configure_logging(config.logging)
    sys.exit(run_serve(config, worker=index))


def supervise_workers(config: LiverecConfig) -> int:
    """Start `serving.workers` replica processes on one port; SIGTERM/SIGINT drains them all.

    A worker that exits on its own takes the others down with it (exit code 1): a replica with
    fewer workers than configured is one the orchestrator should restart, not run on silently.
    """
    context = multiprocessing.get_context("spawn")  # CUDA and gRPC do not survive fork
    workers = [context.Process(target=_run_worker, args=(worker_config(config, i), i), name=f"liverec-serve-{i}")
               for i in range(config.serving.workers)]
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for w in workers:
            w.start()
        print(f"supervising {len(workers)} serving workers on {config.serving.host}:{config.serving.port}",
              flush=True)
        while not stop.wait(0.2):
            if any(not w.is_alive() for w in workers):
                log.error("a serving worker exited; stopping the others",
                          extra={"exit_codes": [w.exitcode for w in workers]})
                break
    finally:
        for w in workers:
            if w.is_alive() and w.pid is not None:
                os.kill(w.pid, signal.SIGTERM)
        for w in workers:
            w.join(config.serving.drain_s + 30)
            if w.is_alive():
                w.kill()
                w.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stop.is_set() and all(w.exitcode == 0 for w in workers) else 1
