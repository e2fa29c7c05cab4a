"""`liverec demo`: the platform end to end on one machine, against a real local broker."""

from __future__ import annotations

import argparse
import dataclasses
import time

from liverec.platform.broker import LocalBroker
from liverec.platform.config import LiverecConfig
from liverec.platform.datasets import load_dataset
from liverec.platform.kafka import ensure_topics, make_consumer, make_producer, topic_specs
from liverec.platform.replay import rebase_times, replay


def count_records(config: LiverecConfig, topics: list[str], expected: int, timeout_s: float = 60.0) -> dict[str, int]:
    """Consume `topics` from the beginning in a fresh group until `expected` records or the timeout."""
    consumer = make_consumer(config.kafka, *topics, group_id=f"liverec-demo-{time.time_ns()}")
    counts = dict.fromkeys(topics, 0)
    deadline = time.monotonic() + timeout_s
    try:
        while sum(counts.values()) < expected and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                counts[tp.topic] += len(records)
    finally:
        consumer.close()
    return counts


def run_demo(config: LiverecConfig, args: argparse.Namespace) -> int:
    with LocalBroker() as broker:
        config = dataclasses.replace(config, kafka=dataclasses.replace(config.kafka, bootstrap_servers=broker.bootstrap))
        print(f"broker: {broker.bootstrap}")
        created = ensure_topics(config.kafka, config.topics)
        print(f"topics created: {', '.join(created)}")
        table, _ = rebase_times(load_dataset(args.dataset).table)
        producer = make_producer(config.kafka)
        try:
            report = replay(table, producer, config.topics.events, limit=args.limit, progress=True)
        finally:
            producer.close()
        print(f"replayed {report.events} events in {report.seconds:.2f}s ({report.events_per_s:,.0f} events/s)")
        names = [spec.name for spec in topic_specs(config.topics)]
        counts = count_records(config, names, report.events)
        print(f"{'topic':<24}{'records':>10}")
        for name in names:
            print(f"{name:<24}{counts[name]:>10}")
        if counts[config.topics.events] != report.events:
            print(f"error: consumed {counts[config.topics.events]} of {report.events} events")
            return 1
    return 0
