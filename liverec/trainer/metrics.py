"""The trainer's Prometheus metrics (one registry per worker, so tests can run several)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from liverec.platform.heap import resident_bytes

BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter("liverec_trainer_events_consumed", "Event records read from Kafka.", registry=r)
        self.applied = Counter("liverec_trainer_events_applied", "Valid events the model learned from.", registry=r)
        self.dead_lettered = Counter("liverec_trainer_events_dead_lettered", "Events sent to the DLQ, by reason.",
                                     ["reason"], registry=r)
        self.batch_seconds = Histogram("liverec_trainer_batch_seconds", "Wall time of one micro-batch, by stage.",
                                       ["stage"], buckets=BATCH_BUCKETS, registry=r)
        self.loss = Gauge("liverec_trainer_loss", "Training loss of the last micro-batch.", registry=r)
        self.preq_scored = Counter("liverec_trainer_prequential_scored", "Events ranked before training on them.",
                                   registry=r)
        self.preq_hits = Counter("liverec_trainer_prequential_hits_at10", "Prequential hits in the top 10.", registry=r)
        self.preq_ndcg_sum = Counter("liverec_trainer_prequential_ndcg_at10_sum", "Sum of prequential NDCG@10.",
                                     registry=r)
        self.preq_hr = Gauge("liverec_trainer_prequential_hr10", "Prequential HR@10 over the recent window.",
                             registry=r)
        self.preq_ndcg = Gauge("liverec_trainer_prequential_ndcg10", "Prequential NDCG@10 over the recent window.",
                               registry=r)
        self.store_gauge = Gauge("liverec_store_stat", "Embedding store statistics per table.", ["table", "stat"],
                                 registry=r)
        self.checkpoint_seconds = Histogram("liverec_trainer_checkpoint_seconds", "Duration of a checkpoint.",
                                            buckets=BATCH_BUCKETS + (30.0, 60.0), registry=r)
        self.last_checkpoint = Gauge("liverec_trainer_last_checkpoint_timestamp_seconds",
                                     "Unix time of the last complete checkpoint.", registry=r)
        self.checkpoint_age = Gauge("liverec_trainer_checkpoint_age_seconds", "Seconds since the last checkpoint.",
                                    registry=r)
        self.checkpoint_age.set_function(self._checkpoint_age)
        self.lag = Gauge("liverec_trainer_consumer_lag", "Records behind the log end, per partition.",
                         ["partition"], registry=r)
        self.state_refreshes = Counter("liverec_trainer_state_refreshes", "User states re-encoded and published.",
                                       registry=r)
        self.state_appends = Counter("liverec_trainer_state_appends",
                                     "User states refreshed by appending the new events to the stored state.",
                                     registry=r)
        self.state_reencoded = Counter("liverec_trainer_state_reencoded",
                                       "Stale user states re-encoded in the background (not touched by a batch).",
                                       registry=r)
        self.state_versions_behind = Gauge("liverec_trainer_state_versions_behind",
                                           "Model versions between the current model and the oldest stored user "
                                           "state.", registry=r)
        self.codec_loss = Gauge("liverec_trainer_codec_loss",
                                "Auxiliary (distillation) loss of the learned state codec, last micro-batch.",
                                registry=r)
        self.heap_released = Counter("liverec_trainer_heap_released_bytes",
                                     "Free heap memory handed back to the OS (malloc_trim).", registry=r)
        self.resident = Gauge("liverec_trainer_resident_bytes", "Resident set size of the trainer process.",
                              registry=r)
        self.resident.set_function(resident_bytes)
        self.model_version = Gauge("liverec_trainer_model_version", "Dense model version (batches applied).",
                                   registry=r)
        self._last_checkpoint_time = time.time()

    def _checkpoint_age(self) -> float:
        return time.time() - self._last_checkpoint_time

    def checkpoint_done(self, seconds: float) -> None:
        self._last_checkpoint_time = time.time()
        self.checkpoint_seconds.observe(seconds)
        self.last_checkpoint.set(self._last_checkpoint_time)

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the bound port (port 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
