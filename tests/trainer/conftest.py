"""Helpers shared by the trainer tests: a small, fast model configuration and ml-100k on the broker."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from kafka import TopicPartition

from liverec.model.config import EncoderConfig, ModelConfig
from liverec.platform.config import LiverecConfig
from liverec.platform.datasets import load_dataset
from liverec.platform.kafka import consumed_to_high_watermark, make_consumer
from liverec.platform.replay import rebase_times, replay_into


def small(config: LiverecConfig, state_dir: Path, **trainer: object) -> LiverecConfig:
    model = ModelConfig(encoder=EncoderConfig(dim=16, layers=1, heads=1, max_len=10))
    tc = dataclasses.replace(config.trainer, state_dir=str(state_dir), negatives=32, batch_events=64,
                             checkpoint_every_events=256, expire_every_events=500, metrics_port=0,
                             item_ttl_s=30 * 24 * 3600, **trainer)
    return dataclasses.replace(config, model=model, trainer=tc)


def publish_ml100k(config: LiverecConfig, ml100k: Path, n: int) -> None:
    replay_into(config, rebase_times(load_dataset(str(ml100k)).table)[0], limit=n)


def read_topic(config: LiverecConfig, topic: str, partitions: int, timeout_s: float = 60.0) -> list:
    """Every record of `topic`, by manual assignment from offset 0 (no group join to wait for),
    read up to the high watermark each partition's fetch responses report: to the log's end
    however slowly the broker answers, where a read that stopped after a quiet spell could stop
    short of it on a loaded machine."""
    consumer = make_consumer(config.kafka, group_id=None)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            if consumed_to_high_watermark(consumer, tps):
                return records
            assert time.monotonic() < deadline, f"{topic}: not read to its end in {timeout_s} s"
    finally:
        consumer.close()


def log_ends(config: LiverecConfig) -> dict[int, int]:
    """Per partition of the events topic, one past the last offset, read from the log itself
    (Tansu's ListOffsets reports the base offset of the last record batch instead, see
    TrainerWorker._log_ends)."""
    ends = dict.fromkeys(range(config.topics.partitions), 0)
    for rec in read_topic(config, config.topics.events, config.topics.partitions):
        ends[rec.partition] = max(ends[rec.partition], rec.offset + 1)
    return ends
