"""Helpers for the service tests: a real snapshot and scorer behind the backend contract, a server on a free port.

Nothing here mocks gRPC or the model: the backend is a freshly initialised SequentialRecommender
turned into a ModelSnapshot from a ParamsVersion (as the replica does), scored by the real
Scorer over the naive HistoryStateSource. Tests that need a slow backend get the same backend
with `recommend` held at a `threading.Event` they control.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from liverec.model.config import EncoderConfig, ModelConfig
from liverec.model.recommender import SequentialRecommender
from liverec.platform.config import ServingConfig
from liverec.serving.backend import ITEM_TABLE, Answer, HistoryStateSource, ModelSnapshot, Query, Scorer
from liverec.serving.params import ParamsVersion
from liverec.serving.service import RecommenderServer, build_server
from liverec.v1 import recommender_pb2_grpc

DIM = 16
N_ITEMS = 300  # item ids 1..300; popularity falls with the id, so cold start answers 1, 2, 3, ...
MODEL_VERSION = 7
NOW_MS = int(time.time() * 1000)
# user -> (items, actions, offset of the newest event, its event time): the users with state.
HISTORIES: dict[int, tuple[np.ndarray, np.ndarray, int, int]] = {
    1: (np.array([5, 17, 42, 99, 100]), np.array([1, 2, 1, 3, 1], np.int8), 1001, NOW_MS - 5_000),
    2: (np.array([7, 8, 9]), np.array([1, 1, 5], np.int8), 2002, NOW_MS - 60_000),
    3: (np.array([250, 260, 270, 280, 290, 11, 12]), np.array([4, 1, 1, 2, 1, 1, 1], np.int8), 3003, NOW_MS),
}
COLD_USER = 424242


def make_snapshot() -> ModelSnapshot:
    """A snapshot the way the replica builds one: a committed ParamsVersion, then ModelSnapshot.build."""
    torch.manual_seed(0)
    config = ModelConfig(encoder=EncoderConfig(dim=DIM, layers=1, heads=1, max_len=10))
    model = SequentialRecommender(config)
    rng = np.random.default_rng(0)
    rows = {ITEM_TABLE: {k: (rng.standard_normal(DIM).astype(np.float32), 1000 - k) for k in range(1, N_ITEMS + 1)}}
    params = ParamsVersion(MODEL_VERSION, NOW_MS, config, model.state_dict(), rows)
    return ModelSnapshot.build(params, "cpu")


@functools.cache
def shared_snapshot() -> ModelSnapshot:
    """One snapshot for every test (snapshots are immutable)."""
    return make_snapshot()


class LocalBackend:
    """The backend contract over the real Scorer; `publish` makes it ready, `gate` slows it down.

    While `gate` is set to an unset Event, `recommend` waits on it (after signalling `entered`):
    the real backend, slowed down at the test's command, so queueing behaviour happens for real.
    """

    def __init__(self, snapshot: ModelSnapshot | None, histories: dict = HISTORIES) -> None:
        self._snapshot = snapshot
        self.scorer = Scorer(HistoryStateSource(histories))
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.scored: list[Query] = []

    def publish(self, snapshot: ModelSnapshot | None) -> None:
        self._snapshot = snapshot

    def snapshot(self) -> ModelSnapshot | None:
        return self._snapshot

    def ready(self) -> bool:
        return self._snapshot is not None

    def recommend(self, snapshot: ModelSnapshot, queries: list[Query]) -> list[Answer]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        self.scored.extend(queries)
        return self.scorer.recommend(snapshot, queries)


@dataclasses.dataclass
class Running:
    server: RecommenderServer
    port: int
    channel: grpc.Channel
    stub: recommender_pb2_grpc.RecommenderStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        value = self.server.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextmanager
def running(backend: LocalBackend, **overrides: object) -> Iterator[Running]:
    """A started server on 127.0.0.1 and a free port, a channel to it; stopped (2 s grace) on exit."""
    config = ServingConfig(**{"port": 0, "metrics_port": -1, **overrides})  # type: ignore[arg-type]
    server, port = build_server(config, backend)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(server, port, channel, recommender_pb2_grpc.RecommenderStub(channel))
    finally:
        if backend.gate is not None:
            backend.gate.set()
        channel.close()
        server.stop(2.0).wait()


def wait_for(condition: Callable[[], bool], what: str, limit_s: float = 30.0) -> None:
    """Wait until `condition` holds (a synchronisation point, not a timing assertion)."""
    end = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


def wait_for_health(channel: grpc.Channel, service: str, status: int) -> None:
    """Follow grpc.health.v1.Health/Watch until `service` reports `status`."""
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
    try:
        for response in stream:
            if response.status == status:
                return
    finally:
        stream.cancel()
    raise AssertionError(f"health watch for {service!r} ended before status {status}")
