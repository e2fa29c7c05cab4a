"""The Python client and `liverec recommend` against a real server."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import grpc
import pytest

from liverec.platform.config import LiverecConfig
from liverec.serving import client
from liverec.serving.client import RecommenderClient
from liverec.serving.service import SERVICE_NAME
from tests.serving.service_harness import (
    COLD_USER, HISTORIES, MODEL_VERSION, LocalBackend, Running, running, shared_snapshot,
)


@pytest.fixture(scope="module")
def serve() -> Iterator[Running]:
    with running(LocalBackend(shared_snapshot())) as r:
        yield r


def test_client_recommends_and_checks_health(serve: Running) -> None:
    with RecommenderClient(serve.target) as c:
        assert c.health() == "SERVING" and c.health(SERVICE_NAME) == "SERVING"
        rec = c.recommend(1, k=3, exclude=[5], exclude_seen=True)
        assert len(rec.items) == 3 and not rec.cold_start
        assert rec.model_version == MODEL_VERSION and rec.state_version == HISTORIES[1][2]
        assert not set(rec.item_ids) & set(HISTORIES[1][0].tolist())
        ranked = c.recommend(2, k=2, candidates=[30, 40, 50])
        assert set(ranked.item_ids) <= {30, 40, 50} and len(ranked.items) == 2
        assert c.recommend(COLD_USER, k=2).item_ids == [1, 2]
        with pytest.raises(grpc.RpcError) as err:
            c.recommend(1, k=0)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def config_for(serve: Running) -> LiverecConfig:
    base = LiverecConfig()
    return dataclasses.replace(base, serving=dataclasses.replace(base.serving, port=serve.port))


def test_command_prints_a_table_or_json(serve: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert client.main([str(COLD_USER), "--k", "3"], config_for(serve)) == 0
    table = capsys.readouterr().out
    assert f"user {COLD_USER}: model version {MODEL_VERSION}, cold start" in table
    assert table.splitlines()[2].split()[:2] == ["1", "1"]  # rank 1: the most popular item
    assert client.main(["2", "--k", "2", "--candidates", "7,8,9,10", "--json"], config_for(serve)) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["user_id"] == 2 and answer["cold_start"] is False and len(answer["items"]) == 2
    assert {i["item_id"] for i in answer["items"]} <= {7, 8, 9, 10}


def test_command_reports_the_status_code(serve: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert client.main(["1", "--k", "0", "--target", serve.target], LiverecConfig()) == 1
    assert "INVALID_ARGUMENT: k must be in 1..1000, got 0" in capsys.readouterr().err
