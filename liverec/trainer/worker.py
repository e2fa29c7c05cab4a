"""The online trainer process: Kafka in, learning, checkpoints, dead letters and metrics out.

One worker owns every partition of the events topic (manual assignment; the model is one
replica). Offsets come from its own newest checkpoint, never from the group: the checkpoint is
the truth, and group commits are made after each checkpoint only so that standard Kafka tooling
shows the trainer's lag.

Two things happen to each record. It is *received* as soon as it is polled: decoded (bad ones
dead-lettered), its item admitted, the event staged in the history store, and its user's state
re-encoded and published. Freshness is this path alone. Then it waits for the *learner*, which
runs one micro-batch at a time on a thread of its own, tests it (prequential: ranked by the
serving model before anything learns from it) and learns it: micro-batches close at `batch_events` records or
`batch_max_ms`, and at most eight of them wait (beyond that the worker stops polling until the
learner catches up). Offsets, counters and checkpoints follow learning. The item table counts
events on receipt, so while a checkpoint is due (or more than a micro-batch already waits)
newly received events are counted by the learner when it learns them instead, and a due
checkpoint is taken once every event counted on receipt has been learned: receiving never
pauses, and what a checkpoint holds always matches its offsets.

In deterministic mode batches are cut by offsets instead, and each is received, learned and
accounted for in turn: each batch takes up to `batch_events` records from every partition, in
partition order, and waits for them; checkpoints and expiry happen on event counts only. With a
log that is not being appended to (a recorded replay) the sequence of batches is then a function
of the offsets alone, so a run killed and restarted any number of times ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from liverec.embedding_store.config import TableConfig
from liverec.embedding_store.store import EmbeddingStore
from liverec.embedding_store.warm_up import warm_up_kernels
from liverec.model.codecs.base import StateCodec
from liverec.model.codecs.record import record_for
from liverec.model.codecs.registry import codec_from_config
from liverec.model.encoder import KVCache
from liverec.platform.config import ConfigError, LiverecConfig
from liverec.platform.heap import HeapTrimmer
from liverec.platform.kafka import consumed_to_high_watermark, ensure_topics, make_consumer, make_producer
from liverec.platform.state_dir import StateDirLock
from liverec.trainer.checkpoint import CheckpointManager
from liverec.trainer.codec_training import CodecTrainer
from liverec.trainer.decode import EventBatch, Rejected, concat_batches, decode_records, warm_up_decoder
from liverec.trainer.dlq import DeadLetterQueue
from liverec.trainer.history import History, HistoryStore
from liverec.trainer.items import ITEM_TABLE, StoreItemTable
from liverec.trainer.learner import OnlineLearner, StepResult
from liverec.trainer.metrics import TrainerMetrics
from liverec.trainer.publish import ParamPublisher
from liverec.trainer.state import StateWriter

log = logging.getLogger(__name__)

_LAG_EVERY_S = 1.0
_PREQ_WINDOW = 5_000  # events in the rolling prequential HR/NDCG gauges
# Item rows a publish produces between two turns of the receive loop: ~30 µs of Python each, so
# a slice delays a newly arrived event by ~2-3 ms instead of a whole publish (~300 ms on the H200
# host at full-softmax training, where every step touches the whole catalog).
_PUBLISH_SLICE_ROWS = 64
# Micro-batches that may wait for the learner. A learner briefly slower than the stream (a
# loaded host) then delays learning, not freshness; the learner catches up with full batches.
_MAX_WAITING_BATCHES = 8
# Stale states re-encoded per turn of the receive loop: each learned micro-batch owes
# `state.reencode_per_batch` of them, paid a few at a time so that an event arriving meanwhile
# waits for a few users' encodes, not for all of them (~26 ms for 32 on the H200 host).
_REENCODE_SLICE_USERS = 8


@dataclass
class Counters:
    """Totals carried in checkpoints: what the restored state has seen, exactly."""

    consumed: int = 0
    applied: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    scored: int = 0
    hits: float = 0.0
    ndcg_sum: float = 0.0
    pop_hits: float = 0.0
    pop_ndcg_sum: float = 0.0


@dataclass(frozen=True)
class Received:
    """A chunk of records as received: all of them (offsets) and the good events."""

    records: list[Any]
    batch: EventBatch
    admitted: bool  # its items were counted on receipt (else the learner counts them)


@dataclass(frozen=True)
class Learning:
    """The micro-batch on the learner's thread."""

    chunks: list[Received]
    batch: EventBatch
    future: Future[StepResult]
    start: float


def build_online_codec(config: LiverecConfig) -> StateCodec:
    """The codec the trainer refreshes states with (a fresh instance: learned ones start untrained)."""
    return codec_from_config(config.state.codec, config.model, **config.state.params)


def item_table_config(config: LiverecConfig) -> TableConfig:
    tc = config.trainer
    return TableConfig(name=ITEM_TABLE, dim=config.model.encoder.dim, min_count=tc.min_count, ttl_s=tc.item_ttl_s,
                       optimizer=tc.item_optimizer, lr=tc.item_lr, initial_capacity=4096)


#: The item table's settings that come from the trainer's config, by the config field they come from.
ITEM_TABLE_FIELDS = {"dim": "model.encoder.dim", "min_count": "trainer.min_count", "ttl_s": "trainer.item_ttl_s",
                     "optimizer": "trainer.item_optimizer", "lr": "trainer.item_lr"}


def check_restored_item_table(restored: TableConfig, configured: TableConfig) -> list[str]:
    """What a restored item table keeps against the config, one line per differing field.

    A checkpoint's table carries its own settings (its rows and per-row optimizer state were
    made with them), so a restart keeps them: changing them takes a fresh state_dir. A width
    that differs from the model's cannot go on at all and is refused, naming the field.
    """
    if restored.dim != configured.dim:
        raise ConfigError(ITEM_TABLE_FIELDS["dim"], f"is {configured.dim} but the checkpoint's item table has "
                                                    f"dim {restored.dim}; use a fresh trainer.state_dir")
    return [f"{path} is {getattr(configured, name)!r} but the checkpoint's item table keeps {getattr(restored, name)!r}"
            for name, path in ITEM_TABLE_FIELDS.items() if getattr(restored, name) != getattr(configured, name)]


class TrainerWorker:
    def __init__(self, config: LiverecConfig, stop: threading.Event | None = None) -> None:
        self.config = config
        tc = config.trainer
        self.stop = stop or threading.Event()
        self.state_dir = Path(tc.state_dir)
        # Created if need be, and locked before anything in it is read or written:
        self.state_dir_lock = StateDirLock(self.state_dir, owner="trainer", field="trainer.state_dir")
        self.metrics = TrainerMetrics()
        self.heap_trimmer = HeapTrimmer(tc.heap_trim_growth_mb << 20)
        self.checkpoints = CheckpointManager(self.state_dir, tc.checkpoints_kept)
        leftovers = self.checkpoints.remove_leftovers()
        if leftovers:
            log.warning("removed the leftovers of interrupted checkpoint writes",
                        extra={"paths": [str(p) for p in leftovers]})
        # The history keeps exactly what the model can attend to: its training window.
        self.history = HistoryStore(self.state_dir / "history", config.model.encoder.max_len)
        restored = self.checkpoints.restore_latest()
        store = restored.store if restored else EmbeddingStore([item_table_config(config)], seed=tc.seed)
        if restored:
            try:
                kept = check_restored_item_table(store.table(ITEM_TABLE).config, item_table_config(config))
            except ConfigError:
                self.history.close()
                self.state_dir_lock.release()
                raise
            if kept:
                log.warning("restored item table keeps its own settings (start from a fresh state_dir to change "
                            "them)", extra={"checkpoint": str(restored.path), "settings": kept})
        self.store = store
        self.learner = OnlineLearner.from_config(config, StoreItemTable(store), self.history)
        self.offsets: dict[int, int] = {}
        self.counters = Counters()
        self._preq_window: list[tuple[int, float, float]] = []
        self.codec = build_online_codec(config)
        # Learned codecs train online; their frozen copy (the published parameters) encodes states.
        self.codec_trainer = (CodecTrainer(lambda: build_online_codec(config), tc.seed)
                              if self.codec.module is not None else None)
        if restored:
            self._load_state(restored.state)
            self.history.restore_from(restored.path / "history")
            log.info("restored checkpoint", extra={"checkpoint": str(restored.path), "offsets": self.offsets,
                                                   "applied": self.counters.applied})
        self._events_since_checkpoint = 0
        self._last_checkpoint_time = time.monotonic()
        self._last_publish_time = 0.0
        self._last_event_time_ms = 0
        self._last_lag_time = 0.0
        self.metrics_port: int | None = None
        # Cumulative wall seconds per stage (consume, decode, history, prequential, store,
        # forward_backward, checkpoint): the train benchmark reports their shares.
        self.stage_seconds: dict[str, float] = {}
        # Received records waiting for the learner, in chunks as received, and the step in flight
        # on the learner's thread.
        self._waiting: list[Received] = []
        self._first_waiting = 0.0
        self._learning: Learning | None = None
        self._checkpoint_due = False
        self._sending: Iterator[int] | None = None  # the publish being produced, a slice at a time
        self._reencodes_owed = 0  # stale states still to re-encode for the steps learned so far
        self._learner_thread = ThreadPoolExecutor(1, thread_name_prefix="learner")

    # -- state -----------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        c = self.counters
        return {
            "model": self.learner.model.state_dict(),
            "serving_model": self.learner.serving_model.state_dict(),
            "optimizer": self.learner.optimizer.state_dict(),
            "version": self.learner.version,
            "torch_rng": torch.get_rng_state(),
            "sampler_rng": self.learner.generator.get_state(),
            "offsets": dict(self.offsets),
            "codec": self.codec_trainer.state_dict() if self.codec_trainer is not None else None,
            "counters": {"consumed": c.consumed, "applied": c.applied, "dead_lettered": dict(c.dead_lettered),
                         "scored": c.scored, "hits": c.hits, "ndcg_sum": c.ndcg_sum,
                         "pop_hits": c.pop_hits, "pop_ndcg_sum": c.pop_ndcg_sum},
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.learner.model.load_state_dict(state["model"])
        self.learner.serving_model.load_state_dict(state.get("serving_model", state["model"]))
        self.learner.optimizer.load_state_dict(state["optimizer"])
        self.learner.version = state["version"]
        torch.set_rng_state(state["torch_rng"])
        self.learner.generator.set_state(state["sampler_rng"])
        self.offsets = {int(p): int(o) for p, o in state["offsets"].items()}
        if self.codec_trainer is not None and state.get("codec") is not None:
            self.codec_trainer.load_state_dict(state["codec"])
        self.counters = Counters(**state["counters"])

    def checkpoint(self) -> Path:
        start = time.perf_counter()
        self.dlq.flush()  # dead letters are durable before the offsets move past them
        path = self.checkpoints.save(self._state(), self.store, self.history.checkpoint)
        self.metrics.checkpoint_done(time.perf_counter() - start)
        self.stage_seconds["checkpoint"] = self.stage_seconds.get("checkpoint", 0.0) + time.perf_counter() - start
        self._events_since_checkpoint = 0
        self._last_checkpoint_time = time.monotonic()
        self._checkpoint_due = False
        self._commit_group_offsets()
        log.info("checkpoint", extra={"checkpoint": str(path), "applied": self.counters.applied,
                                      "seconds": round(time.perf_counter() - start, 3)})
        return path

    def _commit_group_offsets(self) -> None:
        if not self.offsets:
            return
        topic = self.config.topics.events
        self.consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in self.offsets.items()})

    # -- start-up --------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) the kernels that decoding and the store run, before
        the first record waits on them: with the cache empty, as in a new pod, the first poll's
        decode and train lookup took ~12 s here (the freshness of the events in it), and ~0.3 s
        with it warm."""
        start = time.perf_counter()
        warm_up_decoder()
        warm_up_kernels(self.store.configs, device=self.store.device)
        log.info("compiled kernels ready", extra={"seconds": round(time.perf_counter() - start, 3)})

    # -- Kafka -----------------------------------------------------------------------------------

    def _connect(self) -> None:
        config = self.config
        ensure_topics(config.kafka, config.topics)
        self.consumer = make_consumer(config.kafka, group_id=config.trainer.group_id)
        topic = config.topics.events
        deadline = time.monotonic() + 30
        partitions = self.consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            partitions = self.consumer.partitions_for_topic(topic)
        if not partitions:
            raise RuntimeError(f"topic {topic!r} has no partitions visible to the trainer")
        self.partitions = sorted(partitions)
        tps = [TopicPartition(topic, p) for p in self.partitions]
        self.consumer.assign(tps)
        for tp in tps:
            if tp.partition in self.offsets:
                self.consumer.seek(tp, self.offsets[tp.partition])
            else:
                self.consumer.seek_to_beginning(tp)
        self.dlq = DeadLetterQueue(make_producer(config.kafka), config.topics.dlq, self.metrics)
        self.publisher = ParamPublisher(make_producer(config.kafka), config.topics.params, config.model)
        # States go out at once (no linger): each is the end of some event's path to serving.
        self.states = StateWriter(self.codec, self.state_dir / "state", make_producer(config.kafka, linger_ms=0),
                                  config.topics.user_state, max_len=config.model.encoder.max_len,
                                  append_max_versions_behind=config.state.append_max_versions_behind)

    def _log_ends(self) -> dict[int, int] | None:
        """Each partition's log end offset, from the high watermark of the latest fetch responses.

        Not ListOffsets: the local Tansu broker answers ListOffsets(latest) with the base offset of
        a partition's last record batch, while its fetch responses carry the true high watermark
        (as every Kafka broker's do). None until every partition has answered a fetch.
        """
        topic = self.config.topics.events
        marks = {p: self.consumer.highwater(TopicPartition(topic, p)) for p in self.partitions}
        if any(mark is None for mark in marks.values()):
            return None
        return marks  # type: ignore[return-value]

    def _caught_up(self) -> bool:
        """Every partition consumed to its log end as the latest fetch responses report it.

        Idle exit counts quiet time only from here: a broker slow to answer (a loaded machine, a
        stall, the first fetch after a restart) gives no records for a while, yet the log may still
        hold events, and a replay that exits then silently skips them. Before every partition has
        answered a fetch the ends are unknown, so not caught up: an unreachable broker keeps the
        trainer waiting rather than ending the run as if the log were drained."""
        topic = self.config.topics.events
        return consumed_to_high_watermark(self.consumer, [TopicPartition(topic, p) for p in self.partitions])

    def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag_time < _LAG_EVERY_S:
            return
        self._last_lag_time = now
        ends = self._log_ends() or {}
        for p, end in ends.items():
            self.metrics.lag.labels(partition=str(p)).set(max(0, end - self.offsets.get(p, 0)))

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, *, max_events: int | None = None, idle_exit_s: float | None = None) -> Counters:
        """Train until stopped, `max_events` records consumed in total, or `idle_exit_s` without data
        once caught up with the log (`_caught_up`)."""
        tc = self.config.trainer
        self.warm_up()
        self._connect()
        if self.metrics_port is None and tc.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(tc.metrics_host, tc.metrics_port)
        buffers: dict[int, list[Any]] = defaultdict(list)
        ends: dict[int, int] = {}
        taken = self.counters.consumed  # records received so far: learned, or waiting to be
        last_data = time.monotonic()
        try:
            while not self.stop.is_set():
                self._collect_learning(wait=False)
                if max_events is not None and self.counters.consumed >= max_events:
                    break
                got = 0
                if tc.deterministic:
                    got = self._poll_into(buffers, self.config.kafka.consumer_max_poll_records)
                    records = self._cut_by_offsets(buffers, ends)
                    if records:  # received, learned and accounted for in turn: a function of the offsets
                        self._receive(records)
                        self._start_learning()
                        self._collect_learning(wait=True)
                else:
                    got = self._poll_waiting(max_events - taken if max_events is not None else None)
                    taken += got
                now = time.monotonic()
                if got:
                    last_data = now
                if self._checkpoint_due and self._learning is None and not any(c.admitted for c in self._waiting):
                    self.checkpoint()  # before the next step starts: under load the learner is never idle for long
                if self._learning is None and self._waiting and not tc.deterministic:
                    ended = max_events is not None and taken >= max_events
                    draining = self._checkpoint_due and self._waiting[0].admitted
                    if self._waiting_records() >= tc.batch_events or ended or draining \
                            or (now - self._first_waiting) * 1000 >= tc.batch_max_ms:
                        self._start_learning()
                if self._learning is None and not self._waiting:
                    if not tc.deterministic and self._events_since_checkpoint \
                            and now - self._last_checkpoint_time >= tc.checkpoint_every_s:
                        self.checkpoint()
                    if self._reencode_stale():
                        pass  # idle: the bounded background re-encode catches up on stale states
                    elif idle_exit_s is not None and now - last_data >= idle_exit_s and not any(buffers.values()) \
                            and self._caught_up():
                        break
                self._send_publish_slice()
                self._reencode_owed_slice()
                self._update_lag()
        finally:
            try:
                self._collect_learning(wait=True)
                while self._waiting:  # what was received (and admitted) is learned before the last checkpoint
                    self._start_learning()
                    self._collect_learning(wait=True)
            finally:
                self._shutdown()
        return self.counters

    def _poll_into(self, buffers: dict[int, list[Any]], limit: int) -> int:
        start = time.perf_counter()
        polled = self.consumer.poll(timeout_ms=0 if self._sending is not None else 50, max_records=limit)
        self._add_seconds("consume", time.perf_counter() - start)
        got = 0
        for tp, records in polled.items():
            buffers[tp.partition].extend(records)
            got += len(records)
        return got

    def _poll_waiting(self, room: int | None) -> int:
        """Receive whatever arrives, while the learner works on earlier events; at most
        `_MAX_WAITING_BATCHES` micro-batches wait for it (beyond that the learner cannot keep up
        with the stream: wait for it)."""
        tc = self.config.trainer
        # One chunk never exceeds a micro-batch: the learner takes whole chunks.
        limit = min(self.config.kafka.consumer_max_poll_records, tc.batch_events,
                    _MAX_WAITING_BATCHES * tc.batch_events - self._waiting_records())
        if room is not None:
            limit = min(limit, room)
        if limit <= 0:
            self._collect_learning(wait=True, timeout_s=0.05)
            return 0
        buffers: dict[int, list[Any]] = defaultdict(list)
        got = self._poll_into(buffers, limit)
        if got:
            self._receive([r for p in sorted(buffers) for r in buffers[p]])
        return got

    def _cut_by_offsets(self, buffers: dict[int, list[Any]], ends: dict[int, int]) -> list[Any]:
        """Up to `batch_events` records per partition, but only once every partition has them
        (or is at the end offset of the snapshot `ends`); empty while waiting."""
        size = self.config.trainer.batch_events
        if not ends or all(self.offsets.get(p, 0) >= ends[p] for p in self.partitions):
            snapshot = self._log_ends()
            if snapshot is None:
                return []
            ends.clear()
            ends.update(snapshot)
        need = {p: max(0, min(size, ends[p] - self.offsets.get(p, 0))) for p in self.partitions}
        if sum(need.values()) == 0 or any(len(buffers[p]) < n for p, n in need.items()):
            return []
        batch: list[Any] = []
        for p in self.partitions:
            batch.extend(buffers[p][: need[p]])
            del buffers[p][: need[p]]
        return batch

    # -- receiving and learning ------------------------------------------------------------------

    def _receive(self, records: list[Any]) -> None:
        """Decode, dead-letter the bad; admit the good ones' items, stage them in the history and
        refresh their users' states at once. The records then wait for the learner."""
        received = time.perf_counter()
        batch, rejected = decode_records(records)
        self._record_stage("decode", time.perf_counter() - received)
        self._dead_letter(rejected)
        # The item table counts events on receipt, but a checkpoint must hold exactly the learned
        # ones: while one is due, new events are admitted by the learner instead, when learned.
        # So is everything after more than a micro-batch of admitted events waits (a learner
        # behind the stream), which keeps a due checkpoint at most one step away; admission
        # stays in event order.
        admitted = not self._checkpoint_due and all(c.admitted for c in self._waiting) \
            and self._waiting_records() < self.config.trainer.batch_events
        if len(batch):
            if admitted:
                self.learner.admit(batch)
            self.history.stage(batch.user_id, batch.item_id, batch.event_time_ms, batch.action)
            self._last_event_time_ms = max(self._last_event_time_ms, int(batch.event_time_ms.max()))
            refresh_start = time.perf_counter()
            self._refresh_received(batch)
            self._add_seconds("state_refresh", time.perf_counter() - refresh_start)
        if not self._waiting:
            self._first_waiting = time.monotonic()
        self._waiting.append(Received(records, batch, admitted))
        self.metrics.batch_seconds.labels(stage="receive").observe(time.perf_counter() - received)

    def _waiting_records(self) -> int:
        return sum(len(chunk.records) for chunk in self._waiting)

    def _start_learning(self) -> None:
        """Hand the oldest waiting chunks, up to `batch_events` records (at least one chunk), to
        the learner's thread as one micro-batch; the worker keeps receiving meanwhile."""
        limit = self.config.trainer.batch_events
        chunks: list[Received] = []
        count = 0
        while self._waiting and (not chunks or count + len(self._waiting[0].records) <= limit):
            chunks.append(self._waiting.pop(0))
            count += len(chunks[-1].records)
        if self._waiting:
            self._first_waiting = time.monotonic()
        batch = concat_batches([c.batch for c in chunks])
        unadmitted = [c.batch for c in chunks if not c.admitted and len(c.batch)]
        future = self._learner_thread.submit(self._admit_and_learn, concat_batches(unadmitted) if unadmitted else None,
                                             batch)
        self._learning = Learning(chunks, batch, future, time.perf_counter())

    def _admit_and_learn(self, unadmitted: EventBatch | None, batch: EventBatch) -> StepResult:
        if unadmitted is not None:
            self.learner.admit(unadmitted)
        return self.learner.learn(batch)

    def _collect_learning(self, *, wait: bool, timeout_s: float | None = None) -> None:
        """Account for a finished learning step: offsets, counters, metrics, expiry and the state
        work that follows learning; marks a checkpoint due and publishes when due. The learner is
        idle while this runs."""
        learning = self._learning
        if learning is None or (not wait and not learning.future.done()):
            return
        try:
            result = learning.future.result(timeout=timeout_s)
        except FutureTimeout:
            return
        self._learning = None
        tc = self.config.trainer
        m = self.metrics
        records = [r for chunk in learning.chunks for r in chunk.records]
        for rec in records:
            if rec.offset + 1 > self.offsets.get(rec.partition, 0):
                self.offsets[rec.partition] = rec.offset + 1
        batch = learning.batch
        before = self.counters.applied
        self.counters.consumed += len(records)
        self.counters.applied += len(batch)
        m.consumed.inc(len(records))
        m.applied.inc(len(batch))
        self._record_prequential(result)
        released = self.heap_trimmer.maybe_trim()  # a step is what grows the heap: check after each one
        if released:
            self.metrics.heap_released.inc(released)
        if len(batch):
            if not math.isnan(result.loss):
                m.loss.set(result.loss)
            for stage, seconds in result.seconds.items():
                self._record_stage(stage, seconds)
            refresh_start = time.perf_counter()
            self._refresh_learned(batch)
            self._add_seconds("state_refresh", time.perf_counter() - refresh_start)
        if before // tc.expire_every_events != self.counters.applied // tc.expire_every_events and len(batch):
            self.store.expire(int(batch.event_time_ms.max()) // 1000)
        self._events_since_checkpoint += len(records)
        m.batch_seconds.labels(stage="total").observe(time.perf_counter() - learning.start)
        m.model_version.set(self.learner.version)
        for name, stats in self.store.stats().items():
            for stat in ("rows", "capacity", "admitted", "filtered", "expired", "evicted"):
                m.store_gauge.labels(table=name, stat=stat).set(getattr(stats, stat))
        if self._events_since_checkpoint >= tc.checkpoint_every_events \
                or (not tc.deterministic and time.monotonic() - self._last_checkpoint_time >= tc.checkpoint_every_s):
            self._checkpoint_due = True
        if self._publish_due():
            self.publish()

    def _add_seconds(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def _record_stage(self, stage: str, seconds: float) -> None:
        """A stage's time, into the benchmark's totals and the per-stage Prometheus histogram."""
        self._add_seconds(stage, seconds)
        self.metrics.batch_seconds.labels(stage=stage).observe(seconds)

    def publish(self) -> None:
        """Send the parameters changed since the last publish to serving (see publish.py); a
        learned codec's current parameters become the ones states are encoded with from now on,
        published in the same version as the dense weights."""
        self._finish_publish()
        start = time.perf_counter()
        version = self.learner.version
        codec_state = self.codec_trainer.freeze(version) if self.codec_trainer is not None else None
        snapshot = self.publisher.snapshot(self.store, self.learner.serving_model, version, self._last_event_time_ms,
                                           codec_state)
        self._sending = self.publisher.send(snapshot, _PUBLISH_SLICE_ROWS)
        self._last_publish_time = time.monotonic()
        self._add_seconds("publish", time.perf_counter() - start)
        if codec_state is not None:
            self._finish_publish()  # states encoded with these codec parameters follow them, never precede

    def _send_publish_slice(self) -> None:
        """Produce the next slice of the publish in progress (its commit comes with the last)."""
        if self._sending is None:
            return
        start = time.perf_counter()
        if next(self._sending, None) is None:
            self._sending = None
        self._add_seconds("publish", time.perf_counter() - start)

    def _finish_publish(self) -> None:
        while self._sending is not None:
            self._send_publish_slice()

    def _encode(self, histories: list[History]) -> tuple[KVCache, int]:
        """Full caches of `histories` through the serving model, and that model's version (under
        the learner's lock: the learner may be mid-step on its own thread)."""
        with self.learner.lock:
            cache = self.states.encode_histories(histories, self.learner.serving_model, self.learner.items)
            return cache, self.learner.version

    def _encode_payloads(self, histories: list[History], codec: StateCodec) -> tuple[list[bytes], int]:
        """`histories` encoded and compressed by `codec`, and the model version, in one hold of the
        learner's lock (so cache and payload come from the same serving weights)."""
        with self.learner.lock:
            cache, version = self._encode(histories)
            return codec.encode(cache, self.learner.serving_model), version

    def _refresh_received(self, batch: EventBatch) -> None:
        """Rewrite the state of every user in `batch` (just received, staged, not yet learned) with
        the serving model of the moment: appended to where `StateWriter.can_append` allows, else
        re-encoded. Freshness is this path; the learning step does not wait for it, nor it for the
        step. A learned codec's states wait until its first parameters are published."""
        if self.codec_trainer is not None and self.codec_trainer.generation == 0:
            return
        order = np.lexsort((batch.offset, batch.user_id))
        users, first = np.unique(batch.user_id[order], return_index=True)
        ends = np.append(first[1:], len(order))
        last = order[ends - 1]  # each user's newest event in the batch
        new_counts = (ends - first).tolist()
        first_offsets = batch.offset[order[first]].tolist()
        histories = self.history.get_many(users, staged=True)
        old = self.states.stored(users.tolist())
        version = self.learner.version
        append = [i for i, h in enumerate(histories)
                  if self.states.can_append(old[i], len(h), new_counts[i], first_offsets[i], version)]
        chosen = set(append)
        encode = [i for i, h in enumerate(histories) if len(h) and i not in chosen]
        codec, params_version = self._encoding_codec()
        payloads: dict[int, bytes] = {}
        versions: dict[int, int] = {}
        if encode:
            encoded, encoded_version = self._encode_payloads([histories[i] for i in encode], codec)
            payloads.update(zip(encode, encoded))
            versions.update(dict.fromkeys(encode, encoded_version))
        if append:
            with self.learner.lock:
                appended = self.states.append([old[i] for i in append], [histories[i] for i in append],  # type: ignore[misc]
                                              [new_counts[i] for i in append], self.learner.serving_model,
                                              self.learner.items)
            payloads.update(zip(append, appended))
            versions.update({i: old[i].model_version for i in append})  # type: ignore[union-attr]
            self.metrics.state_appends.inc(len(append))
        rows = sorted(payloads)
        records = [record_for(codec, payloads[i], versions[i], int(batch.offset[last[i]]),
                              int(batch.event_time_ms[last[i]]), params_version) for i in rows]
        self.states.write([int(users[i]) for i in rows], [histories[i] for i in rows], records,
                          [versions[i] for i in rows], [old[i].model_version if old[i] else None for i in rows])
        self.metrics.state_refreshes.inc(len(rows))

    def _refresh_learned(self, batch: EventBatch) -> None:
        """After a learning step: a learned codec trains one step on the caches of the step's users
        under the new model (states written from them too: that is their first state before the
        codec is first published); the step then owes a bounded number of stale states' re-encodes,
        paid a slice per turn of the receive loop."""
        if self.codec_trainer is not None:
            users = np.unique(batch.user_id)
            histories = self.history.get_many(users, staged=True)
            keep = [i for i, h in enumerate(histories) if len(h)]
            if keep:
                cache, version = self._encode([histories[i] for i in keep])
                _keys, catalog, _counts = self.learner.items.catalog()
                self.metrics.codec_loss.set(self.codec_trainer.step(self.learner.serving_model, cache, catalog))
                if self.codec_trainer.generation == 0 or self._publish_due():
                    self.publish()  # states are encoded with parameters serving receives
                old = self.states.stored(users[keep].tolist())
                codec, params_version = self._encoding_codec()
                payloads = codec.encode(cache, self.learner.serving_model)
                # A stored state may already include newer (received, staged) events: keep its mark.
                last = [max((o.last_offset, o.last_event_time_ms), newest) if o else newest
                        for o, newest in zip(old, self._newest(batch, users[keep]))]
                records = [record_for(codec, payload, version, offset, time_ms, params_version)
                           for payload, (offset, time_ms) in zip(payloads, last)]
                self.states.write(users[keep].tolist(), [histories[i] for i in keep], records, [version] * len(keep),
                                  [o.model_version if o else None for o in old])
                self.metrics.state_refreshes.inc(len(keep))
        self._reencodes_owed += self.config.state.reencode_per_batch

    def _newest(self, batch: EventBatch, users: np.ndarray) -> list[tuple[int, int]]:
        """(offset, event time) of the newest stored-history event of each of `users` in `batch`."""
        order = np.lexsort((batch.offset, batch.user_id))
        sorted_users = batch.user_id[order]
        last = order[np.searchsorted(sorted_users, users, side="right") - 1]
        return list(zip(batch.offset[last].tolist(), batch.event_time_ms[last].tolist()))

    def _encoding_codec(self) -> tuple[StateCodec, int]:
        """The codec instance states are encoded with now, and its parameter version."""
        if self.codec_trainer is None:
            return self.codec, 0
        return self.codec_trainer.frozen, self.codec_trainer.generation

    def _publish_due(self) -> bool:
        return time.monotonic() - self._last_publish_time >= self.config.trainer.publish_every_s

    def _reencode_owed_slice(self) -> None:
        """Pay off a slice of the re-encodes the learned steps owe (none left stale: all paid)."""
        if self._reencodes_owed:
            handled = self._reencode_stale(min(self._reencodes_owed, _REENCODE_SLICE_USERS))
            self._reencodes_owed = self._reencodes_owed - handled if handled else 0

    def _reencode_stale(self, limit: int | None = None) -> int:
        """Re-encode, from the history store, up to `limit` (default `state.reencode_per_batch`)
        users whose state is from an older model version, oldest first; returns how many index
        entries it handled."""
        version = self.learner.version
        ready = self.codec_trainer is None or self.codec_trainer.generation > 0
        limit = self.config.state.reencode_per_batch if limit is None else limit
        stale = self.states.stalest(limit, version) if ready else []
        if stale:
            start = time.perf_counter()
            users = [u for u, _ in stale]
            histories = self.history.get_many(np.asarray(users, dtype=np.int64), staged=True)
            old = self.states.stored(users)
            rows = [i for i, h in enumerate(histories) if len(h) and old[i] is not None]
            kept = set(rows)
            self.states.forget([entry for i, entry in enumerate(stale) if i not in kept])
            if rows:
                codec, params_version = self._encoding_codec()
                payloads, version = self._encode_payloads([histories[i] for i in rows], codec)
                records = [record_for(codec, payload, version, old[i].last_offset,  # type: ignore[union-attr]
                                      old[i].last_event_time_ms, params_version)  # type: ignore[union-attr]
                           for i, payload in zip(rows, payloads)]
                self.states.write([users[i] for i in rows], [histories[i] for i in rows], records,
                                  [version] * len(rows), [stale[i][1] for i in rows])
                self.metrics.state_reencoded.inc(len(rows))
            seconds = time.perf_counter() - start
            self.stage_seconds["state_reencode"] = self.stage_seconds.get("state_reencode", 0.0) + seconds
        oldest = self.states.oldest_version()
        self.metrics.state_versions_behind.set(max(0, version - oldest) if oldest is not None else 0)
        return len(stale)

    def _dead_letter(self, rejected: list[Rejected]) -> None:
        if not rejected:
            return
        self.dlq.send(rejected)
        for r in rejected:
            self.counters.dead_lettered[r.reason] = self.counters.dead_lettered.get(r.reason, 0) + 1
        log.warning("dead-lettered events", extra={"count": len(rejected), "reasons": sorted({r.reason for r in rejected})})

    def _record_prequential(self, r: StepResult) -> None:
        """Counted once learned (with the offsets), so a restart never counts an event twice."""
        c, m = self.counters, self.metrics
        c.scored += r.scored
        c.hits += r.hits
        c.ndcg_sum += r.ndcg_sum
        c.pop_hits += r.pop_hits
        c.pop_ndcg_sum += r.pop_ndcg_sum
        if r.scored:
            m.preq_scored.inc(r.scored)
            m.preq_hits.inc(r.hits)
            m.preq_ndcg_sum.inc(r.ndcg_sum)
            self._preq_window.append((r.scored, r.hits, r.ndcg_sum))
            while sum(s for s, _, _ in self._preq_window) > _PREQ_WINDOW and len(self._preq_window) > 1:
                self._preq_window.pop(0)
            scored = sum(s for s, _, _ in self._preq_window)
            m.preq_hr.set(sum(h for _, h, _ in self._preq_window) / scored)
            m.preq_ndcg.set(sum(n for _, _, n in self._preq_window) / scored)

    def _shutdown(self) -> None:
        """A final checkpoint when anything is unsaved, then close every client."""
        try:
            if self._events_since_checkpoint:
                self.checkpoint()
            if self.learner.version:
                self.publish()
            self._finish_publish()
        finally:
            self.publisher.producer.close()
            self.states.producer.close()
            self.states.close()
            self.dlq.producer.close()
            self.consumer.close()
            self.history.close()
            self._learner_thread.shutdown()
            self.state_dir_lock.release()

    def online_metrics(self) -> dict[str, float]:
        c = self.counters
        n = max(c.scored, 1)
        return {"scored": c.scored, "HR@10": c.hits / n, "NDCG@10": c.ndcg_sum / n,
                "popularity_HR@10": c.pop_hits / n, "popularity_NDCG@10": c.pop_ndcg_sum / n}


def state_digest(worker: TrainerWorker) -> dict[str, Any]:
    """Exact fingerprints of the trained state, for comparing two runs bit for bit."""
    import hashlib

    def digest(tensors: list[torch.Tensor]) -> str:
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    keys, weights = worker.store.table_items(ITEM_TABLE)
    order = torch.argsort(keys)
    history = hashlib.sha256()
    for user, hist in worker.history.items():
        history.update(np.int64(user).tobytes() + hist.item.tobytes() + hist.time_ms.tobytes() + hist.action.tobytes())
    trainer = worker.codec_trainer
    codec = trainer.state_dict()["live"] if trainer is not None else {}
    return {
        "dense": digest([v for _, v in sorted(worker.learner.model.state_dict().items())]),
        "serving": digest([v for _, v in sorted(worker.learner.serving_model.state_dict().items())]),
        "codec": digest([v for _, v in sorted(codec.items())]),
        "store": digest([keys[order], weights[order]]),
        "history": history.hexdigest(),
        "applied": worker.counters.applied,
    }
