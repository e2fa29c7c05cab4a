"""`liverec bench ingest`: events/s into and out of the local broker, against bare kafka-python loops.

Produce: `liverec.platform.replay.replay` (encoding each event from the columnar table,
keyed by user, idempotent producer, delivery checked) against a bare loop that sends the same
pre-encoded bytes with the same producer settings.
Consume: the trainer's `EventSource` (poll, decode, validate into a columnar batch) against a
bare poll loop that only counts records, over the same topic.
Both sides run alternately in the same process against the same broker, several rounds, and the
median is reported, so machine noise hits both alike. Target: ratio ≥ 0.8 of the bare loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from benchmarks.report import machine, report
from liverec.platform.broker import LocalBroker
from liverec.platform.config import LiverecConfig
from liverec.platform.datasets import EventTable, SyntheticConfig, synthetic
from liverec.platform.events import encode_table
from liverec.platform.kafka import make_admin, make_consumer, make_producer, native_crc32c
from liverec.platform.replay import replay
from liverec.trainer.source import EventSource

RESULTS = Path(__file__).resolve().parent / "results"


def _new_topic(config: LiverecConfig, name: str, partitions: int) -> str:
    from kafka.admin import NewTopic

    admin = make_admin(config.kafka)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()
    return name


def produce_liverec(config: LiverecConfig, table: EventTable, topic: str) -> float:
    producer = make_producer(config.kafka)
    try:
        report = replay(table, producer, topic)
    finally:
        producer.close()
    return report.events_per_s


def produce_bare(config: LiverecConfig, pairs: list[tuple[bytes, bytes]], topic: str) -> float:
    producer = make_producer(config.kafka)
    try:
        start = time.perf_counter()
        for key, value in pairs:
            producer.send(topic, key=key, value=value)
        producer.flush()
        elapsed = time.perf_counter() - start
    finally:
        producer.close()
    return len(pairs) / elapsed


def consume_liverec(config: LiverecConfig, topic: str, expected: int) -> float:
    source = EventSource(make_consumer(config.kafka, group_id=None))
    try:
        source.assign_from_beginning(topic)
        start = time.perf_counter()
        applied = 0
        while applied < expected:
            polled = source.poll(timeout_ms=1000)
            if polled.rejected:
                raise RuntimeError(f"{len(polled.rejected)} events rejected: {polled.rejected[0].reason}")
            applied += len(polled.batch)
        return expected / (time.perf_counter() - start)
    finally:
        source.consumer.close()


def consume_bare(config: LiverecConfig, topic: str, expected: int) -> float:
    from kafka import TopicPartition

    consumer = make_consumer(config.kafka, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        start = time.perf_counter()
        seen = 0
        while seen < expected:
            for records in consumer.poll(timeout_ms=1000).values():
                seen += len(records)
        return expected / (time.perf_counter() - start)
    finally:
        consumer.close()


def run(events: int, rounds: int, partitions: int, seed: int) -> dict:
    table = synthetic(dataclasses.replace(SyntheticConfig(seed=seed), num_events=events))
    table = table.slice(0, min(events, len(table)))
    pairs = list(encode_table(table))
    n = len(pairs)
    samples: dict[str, list[float]] = {k: [] for k in ("produce_liverec", "produce_bare", "consume_liverec", "consume_bare")}
    with LocalBroker() as broker:
        base = LiverecConfig()
        config = dataclasses.replace(base, kafka=dataclasses.replace(base.kafka, bootstrap_servers=broker.bootstrap))
        for r in range(rounds):
            # Alternate which side goes first, so warm-up and drift do not favour one of them.
            order = ("liverec", "bare") if r % 2 == 0 else ("bare", "liverec")
            topics = {}
            for side in order:
                topic = _new_topic(config, f"bench.ingest.{side}.{r}", partitions)
                topics[side] = topic
                rate = produce_liverec(config, table, topic) if side == "liverec" else produce_bare(config, pairs, topic)
                samples[f"produce_{side}"].append(rate)
            for side in order:
                # Both read the topic the liverec replay wrote: identical bytes and partition layout.
                fn = consume_liverec if side == "liverec" else consume_bare
                samples[f"consume_{side}"].append(fn(config, topics["liverec"], n))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "benchmark": "ingest",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "kafka_crc32c": "native" if native_crc32c() else "pure-python",
        "events": n,
        "rounds": rounds,
        "partitions": partitions,
        "events_per_s": med,
        "samples": samples,
        "ratio_produce": med["produce_liverec"] / med["produce_bare"],
        "ratio_consume": med["consume_liverec"] / med["consume_bare"],
        "target_ratio": 0.8,
    }


def print_table(result: dict) -> None:
    eps = result["events_per_s"]
    print(f"ingest benchmark — {result['events']:,} events × {result['rounds']} rounds, "
          f"{result['partitions']} partitions, local Tansu broker ({result['date']}, {result['machine']}, "
          f"{result['kafka_crc32c']} CRC-32C)")
    print(f"{'path':<10}{'liverec ev/s':>16}{'bare kafka-python ev/s':>26}{'ratio':>8}{'target':>8}")
    for path in ("produce", "consume"):
        ratio = result[f"ratio_{path}"]
        print(f"{path:<10}{eps[f'{path}_liverec']:>16,.0f}{eps[f'{path}_bare']:>26,.0f}{ratio:>8.2f}{'≥0.80':>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="liverec bench ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="20,000 events, 1 round")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", type=Path, default=RESULTS / "ingest.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.rounds = 20_000, 1
    result = run(args.events, args.rounds, args.partitions, args.seed)
    report(result, args.out, print_table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
