"""Kafka client factories and idempotent topic creation, all driven by `KafkaConfig`.

Every client in liverec is built here so that security settings (SASL, TLS) and the short group
timeouts are applied in exactly one place.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.record import util as record_util

from liverec.platform.config import KafkaConfig, TopicsConfig

log = logging.getLogger(__name__)


def native_crc32c() -> bool:
    """Whether kafka-python checksums record batches with the `crc32c` C extension.

    Without it kafka-python falls back to a pure-Python CRC-32C at ~110 ns per byte, paid on
    every batch produced and on every batch consumed (`check_crcs`): measured on two cores, 1.20x
    the trainer's events/s with it and 1.4x a consumer's. It is a pinned dependency; this is for
    installs that lost it."""
    return record_util.crc32c_c is not None


@functools.cache
def _warn_without_native_crc32c() -> None:
    if not native_crc32c():
        log.warning("kafka-python is using its pure-Python CRC-32C (the crc32c package is missing): "
                    "producing and consuming will be several times slower; pip install crc32c")


def _common(config: KafkaConfig) -> dict[str, Any]:
    _warn_without_native_crc32c()
    settings: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in config.bootstrap_servers.split(",")],
        "client_id": config.client_id,
        "security_protocol": config.security_protocol,
        "request_timeout_ms": config.request_timeout_ms,
    }
    if config.sasl_mechanism:
        settings["sasl_mechanism"] = config.sasl_mechanism
        settings["sasl_plain_username"] = config.sasl_username
        settings["sasl_plain_password"] = config.sasl_password
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(config, name):
            settings[name] = getattr(config, name)
    return settings


def make_producer(config: KafkaConfig, **overrides: Any) -> KafkaProducer:
    """An idempotent producer (acks=all): retries never duplicate or reorder a partition's records."""
    settings = _common(config) | {
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": config.producer_linger_ms,
        "batch_size": config.producer_batch_size,
    }
    return KafkaProducer(**(settings | overrides))


def make_consumer(config: KafkaConfig, *topics: str, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits: offsets are owned by whoever checkpoints them."""
    settings = _common(config) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": config.session_timeout_ms,
        "heartbeat_interval_ms": config.heartbeat_interval_ms,
        "max_poll_records": config.consumer_max_poll_records,
        "fetch_max_wait_ms": config.consumer_fetch_max_wait_ms,
    }
    return KafkaConsumer(*topics, **(settings | overrides))


def consumed_to_high_watermark(consumer: KafkaConsumer, partitions: list[TopicPartition]) -> bool:
    """Whether `consumer` has read each of `partitions` up to the high watermark its latest fetch
    response reported: the log's end, as far as this consumer can know it. A partition that has
    not answered a fetch yet has no known end, so it is not caught up. (Not ListOffsets: the local
    Tansu broker answers ListOffsets(latest) with the base offset of the last record batch.)"""
    marks = [consumer.highwater(tp) for tp in partitions]
    return all(mark is not None and consumer.position(tp) >= mark for tp, mark in zip(partitions, marks))


def make_admin(config: KafkaConfig, **overrides: Any) -> KafkaAdminClient:
    return KafkaAdminClient(**(_common(config) | overrides))


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str]


def topic_specs(topics: TopicsConfig) -> list[TopicSpec]:
    """The topics liverec needs. The changelogs are compacted: only each key's latest record matters."""
    compacted = {"cleanup.policy": "compact"}
    return [
        TopicSpec(topics.events, topics.partitions, topics.replication_factor, {}),
        TopicSpec(topics.dlq, 1, topics.replication_factor, {}),
        TopicSpec(topics.user_state, topics.partitions, topics.replication_factor, dict(compacted)),
        TopicSpec(topics.params, 1, topics.replication_factor, dict(compacted)),
    ]


def ensure_topics(config: KafkaConfig, topics: TopicsConfig) -> list[str]:
    """Create whichever liverec topics are missing; return the names created (idempotent)."""
    admin = make_admin(config)
    try:
        existing = set(admin.list_topics())
        missing = [s for s in topic_specs(topics) if s.name not in existing]
        created = []
        for spec in missing:
            try:
                admin.create_topics(
                    [NewTopic(spec.name, spec.partitions, spec.replication_factor, topic_configs=spec.configs)]
                )
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass  # another process created it between our listing and our request
        if created:
            log.info("created topics", extra={"topics": created})
        return created
    finally:
        admin.close()
