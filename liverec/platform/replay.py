"""Publish a dataset to Kafka in event-time order, as a live stream would have produced it."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from kafka import KafkaProducer
from kafka.partitioner.default import murmur2
from tqdm import tqdm

from liverec.platform.config import LiverecConfig
from liverec.platform.datasets import EventTable
from liverec.platform.events import MIN_EVENT_TIME_MS, encode_table, sort_check
from liverec.platform.kafka import ensure_topics, make_producer

_PACE_CHUNK = 256  # events sent between pacing checks: keeps --rate accurate without a clock call per event
_PARTITIONS_CACHED = 1_000_000  # keys whose partition a replay remembers (~150 MB at most)


def parse_rate(text: str) -> float | None:
    """A --rate argument: events per second, or 'max' (None: as fast as possible)."""
    if text == "max":
        return None
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rate must be a number of events/s or 'max', got {text!r}") from None
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"--rate must be > 0, got {text!r}")
    return rate


class ReplayError(RuntimeError):
    """Some events could not be delivered; the count and the first error are in the message."""


@dataclass(frozen=True)
class ReplayReport:
    topic: str
    events: int
    bytes: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def key_partitioner(producer: KafkaProducer, topic: str) -> Callable[[bytes], int]:
    """The partition of each key as the producer's default partitioner picks it (murmur2 of the
    key, as the Java client does, over the sorted partitions), worked out once per key.

    kafka-python runs that murmur2 in pure Python on every keyed send, ~2.5 us here, an eighth of
    a send; a replay sends each user's key thousands of times."""
    partitions = sorted(producer.partitions_for(topic))
    chosen: dict[bytes, int] = {}

    def partition(key: bytes) -> int:
        found = chosen.get(key)
        if found is None:
            if len(chosen) >= _PARTITIONS_CACHED:  # a bound on memory: the choice is a pure function
                chosen.clear()
            found = chosen[key] = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
        return found

    return partition


def replay(
    table: EventTable,
    producer: KafkaProducer,
    topic: str,
    *,
    rate: float | None = None,
    limit: int | None = None,
    progress: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> ReplayReport:
    """Send `table` (up to `limit` events) to `topic` keyed by user id; `rate` events/s or as fast as possible.

    Delivery is confirmed before returning: a failed send raises ReplayError instead of being
    silently dropped.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    sort_check(table)
    total = len(table) if limit is None else min(limit, len(table))
    failures: list[BaseException] = []
    sent_bytes = 0
    bar = tqdm(total=total, unit="ev", desc=f"replay → {topic}", file=sys.stderr, disable=not progress,
               smoothing=0.1, dynamic_ncols=True)
    partition = key_partitioner(producer, topic)
    start = clock()
    for i, (key, value) in enumerate(encode_table(table, 0, total)):
        producer.send(topic, key=key, value=value, partition=partition(key)).add_errback(failures.append)
        sent_bytes += len(value)
        if (i + 1) % _PACE_CHUNK == 0:
            bar.update(_PACE_CHUNK)
            if rate is not None:
                ahead = start + (i + 1) / rate - clock()
                if ahead > 0:
                    time.sleep(ahead)
    producer.flush()
    bar.update(total - bar.n)
    bar.close()
    elapsed = clock() - start
    if failures:
        raise ReplayError(f"{len(failures)} of {total} events were not delivered; first error: {failures[0]!r}")
    return ReplayReport(topic=topic, events=total, bytes=sent_bytes, seconds=elapsed)



def replay_into(config: LiverecConfig, table: EventTable, limit: int | None = None) -> ReplayReport:
    """Create the topics if missing and send `table` (up to `limit` events) to the events topic
    with a producer of its own: what benchmarks and tests do before a trainer runs."""
    ensure_topics(config.kafka, config.topics)
    producer = make_producer(config.kafka)
    try:
        return replay(table, producer, config.topics.events, limit=limit)
    finally:
        producer.close()


# 2020-01-01T00:00:00Z: where a dataset older than the trainer's validity floor is moved to.
REBASE_TARGET_MS = 1_577_836_800_000


def rebase_times(table: EventTable, floor_ms: int = MIN_EVENT_TIME_MS) -> tuple[EventTable, int]:
    """Shift a dataset that starts before `floor_ms` so it starts at 2020-01-01, gaps unchanged.

    Historical datasets (MovieLens 100K is from 1997) would otherwise be dead-lettered for their
    age. The shift is a constant, so replays stay deterministic; it is reported to the caller.
    """
    if len(table) == 0 or int(table.event_time_ms[0]) >= floor_ms:
        return table, 0
    shift = REBASE_TARGET_MS - int(table.event_time_ms[0])
    return dataclasses.replace(table, event_time_ms=table.event_time_ms + shift), shift
