"""The Kafka client factories' environment: kafka-python's record checksums."""

from __future__ import annotations

import subprocess
import sys

from kafka.record import util as record_util

from liverec.platform.kafka import native_crc32c

# CRC-32C (Castagnoli) of b"123456789": the standard check value.
_CHECK_VALUE = 0xE3069283


def test_kafka_python_checksums_with_the_native_crc32c() -> None:
    assert native_crc32c()
    assert record_util.calc_crc32c(memoryview(b"123456789")) == _CHECK_VALUE
    assert record_util.calc_crc32c.__defaults__[0] is record_util.crc32c_c


def test_a_client_built_without_the_native_crc32c_warns_once() -> None:
    """In a fresh interpreter where the crc32c package cannot be imported, kafka-python falls back
    to its pure-Python CRC (still correct), and building clients logs one warning that says so."""
    code = (
        "import sys, logging; sys.modules['crc32c'] = None; logging.basicConfig(level=logging.WARNING)\n"
        "from kafka.record import util\n"
        "from liverec.platform.config import KafkaConfig\n"
        "from liverec.platform import kafka\n"
        "assert not kafka.native_crc32c()\n"
        f"assert util.calc_crc32c(memoryview(b'123456789')) == {_CHECK_VALUE}\n"
        "kafka._common(KafkaConfig()); kafka._common(KafkaConfig())\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("pure-Python CRC-32C") == 1, run.stderr
