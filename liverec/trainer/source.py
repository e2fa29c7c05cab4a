"""The trainer's view of `liverec.events`: polls records and hands back decoded, validated batches."""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition

from liverec.trainer.decode import EventBatch, Rejected, ValidationRules, decode_records


@dataclass(frozen=True)
class Polled:
    batch: EventBatch
    rejected: list[Rejected]
    records: int
    bytes: int


class EventSource:
    """Wraps a consumer: poll → decode → validate, one call per micro-batch."""

    def __init__(self, consumer: KafkaConsumer, rules: ValidationRules = ValidationRules()) -> None:
        self.consumer = consumer
        self.rules = rules

    def poll(self, timeout_ms: int, max_records: int | None = None) -> Polled:
        """Records from every assigned partition, merged in a fixed (partition, offset) order.

        Fixed order makes a micro-batch's content a function of offsets alone, which the
        deterministic replay mode relies on.
        """
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        records = [rec for tp in sorted(polled, key=lambda t: (t.topic, t.partition)) for rec in polled[tp]]
        batch, rejected = decode_records(records, self.rules)
        return Polled(batch, rejected, len(records), sum(len(r.value or b"") for r in records))

    def assign_from_beginning(self, topic: str) -> list[TopicPartition]:
        """Manual assignment of every partition of `topic`, from offset 0 (no group protocol)."""
        partitions = sorted(self.consumer.partitions_for_topic(topic) or ())
        tps = [TopicPartition(topic, p) for p in partitions]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        return tps
