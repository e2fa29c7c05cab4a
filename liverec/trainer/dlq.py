"""Dead-letter queue: bad events go to `liverec.events.dlq` with their original bytes and why.

Headers carry the reason, a detail, and where the record came from (topic, partition, offset),
so an operator can find, fix and re-publish it; (partition, offset) also lets a reader drop the
duplicate a crash-and-replay may produce (the DLQ is at-least-once, training is exactly-once).
"""

from __future__ import annotations

from kafka import KafkaProducer

from liverec.trainer.decode import Rejected
from liverec.trainer.metrics import TrainerMetrics


class DeadLetterQueue:
    def __init__(self, producer: KafkaProducer, topic: str, metrics: TrainerMetrics) -> None:
        self.producer = producer
        self.topic = topic
        self.metrics = metrics

    def send(self, rejected: list[Rejected]) -> None:
        for r in rejected:
            headers = [
                ("reason", r.reason.encode()),
                ("detail", r.detail.encode()[:512]),
                ("source.topic", r.record.topic.encode()),
                ("source.partition", str(r.record.partition).encode()),
                ("source.offset", str(r.record.offset).encode()),
            ]
            self.producer.send(self.topic, key=r.record.key, value=r.record.value or b"", headers=headers)
            self.metrics.dead_lettered.labels(reason=r.reason).inc()

    def flush(self) -> None:
        self.producer.flush()
