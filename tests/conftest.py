"""Shared fixtures: one real Tansu broker for the whole session, isolated topics per test."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from liverec.platform.broker import LocalBroker
from liverec.platform.config import LiverecConfig, TopicsConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LIVEREC_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
ML100K = DATA_DIR / "ml-100k"


@pytest.fixture(scope="session")
def broker() -> Iterator[LocalBroker]:
    with LocalBroker() as running:
        yield running


@pytest.fixture
def config(broker: LocalBroker) -> LiverecConfig:
    """A config pointing at the session broker with topic names unique to this test."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    base = LiverecConfig()
    topics = TopicsConfig(
        events=f"{prefix}.events", dlq=f"{prefix}.events.dlq",
        user_state=f"{prefix}.user-state", params=f"{prefix}.params", partitions=4,
    )
    return dataclasses.replace(base, kafka=dataclasses.replace(base.kafka, bootstrap_servers=broker.bootstrap),
                               topics=topics)


@pytest.fixture
def cli_env(config: LiverecConfig) -> dict[str, str]:
    """Environment for a `liverec` subprocess using this test's broker and topics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEREC_")}
    env["LIVEREC_KAFKA__BOOTSTRAP_SERVERS"] = config.kafka.bootstrap_servers
    for name in ("events", "dlq", "user_state", "params"):
        env[f"LIVEREC_TOPICS__{name.upper()}"] = getattr(config.topics, name)
    env["LIVEREC_TOPICS__PARTITIONS"] = str(config.topics.partitions)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def ml100k() -> Path:
    """The MovieLens 100K directory beside the repository (never copied into it)."""
    assert (ML100K / "ml-100k.inter").is_file(), f"ml-100k not found under {DATA_DIR}; set LIVEREC_DATA_DIR"
    return ML100K


def assert_refused_beside(holder: subprocess.Popen, cmd: list[str], env: dict[str, str], field: str, state_dir: Path,
                          owner: str) -> None:
    """`cmd`, started beside `holder` on the same state directory, exits 1 at once with a message
    naming the field, the directory and the holder's pid, and no traceback."""
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"{field} {state_dir} is in use by another {owner} process (pid {holder.pid} on " in second.stderr
    assert "Traceback" not in second.stderr
