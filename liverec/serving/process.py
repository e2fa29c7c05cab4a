"""`liverec serve`: one serving replica process — replica + scorer + gRPC server, until signalled."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Gauge

from liverec.model.codecs.base import StateCodec
from liverec.model.codecs.registry import codec_from_config
from liverec.platform.config import LiverecConfig
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
    replica.on_snapshot = lambda snap: version.set(snap.version)
    ready.set_function(lambda: float(replica.ready()))
    lag.set_function(lambda: float(sum(replica.lag().values())))
    if replica.snapshot() is not None:
        version.set(replica.snapshot().version)
    return replica, ReplicaBackend(replica, Scorer(replica))


def run_serve(config: LiverecConfig) -> int:
    registry = CollectorRegistry()
    replica, backend = build_replica(config, registry)
    server, port = build_server(config.serving, backend, registry)
    replica.start()
    server.start()
    print(f"serving liverec.v1.Recommender on {config.serving.host}:{port} (device {replica.device})", flush=True)
    try:
        serve_until_signalled(server)
    finally:
        replica.stop()
    return 0
