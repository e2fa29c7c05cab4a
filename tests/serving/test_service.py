"""liverec.v1.Recommender over a real socket: answers, status codes, health, reflection, metrics."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from liverec.platform.config import ServingConfig
from liverec.serving.backend import Query
from liverec.serving.service import SERVICE_NAME, build_server
from liverec.v1 import recommender_pb2 as pb
from tests.serving.service_harness import (
    COLD_USER, HISTORIES, MODEL_VERSION, N_ITEMS, LocalBackend, Running, running, shared_snapshot, wait_for_health,
)

MAX_K, MAX_CANDIDATES = 50, 20


@pytest.fixture(scope="module")
def serve() -> Iterator[Running]:
    """One server for the read-only tests of this module, with small limits to test them."""
    with running(LocalBackend(shared_snapshot()), max_k=MAX_K, max_candidates=MAX_CANDIDATES) as r:
        yield r


def call(serve: Running, **fields: object) -> pb.RecommendResponse:
    return serve.stub.Recommend(pb.RecommendRequest(**fields), timeout=30)


def items(response: pb.RecommendResponse) -> list[int]:
    return [i.item_id for i in response.items]


BAD_REQUESTS = {
    "k zero": dict(user_id=1, k=0),
    "k negative": dict(user_id=1, k=-3),
    "k above max_k": dict(user_id=1, k=MAX_K + 1),
    "user id zero": dict(user_id=0, k=5),
    "user id negative": dict(user_id=-5, k=5),
    "too many candidates": dict(user_id=1, k=5, candidate_item_ids=list(range(1, MAX_CANDIDATES + 2))),
    "candidate id zero": dict(user_id=1, k=5, candidate_item_ids=[3, 0, 4]),
    "candidate id negative": dict(user_id=1, k=5, candidate_item_ids=[3, -4]),
    "duplicate candidates": dict(user_id=1, k=5, candidate_item_ids=[3, 4, 3]),
    "excluded id negative": dict(user_id=1, k=5, exclude_item_ids=[-1]),
    "too many exclusions": dict(user_id=1, k=5, exclude_item_ids=list(range(1, MAX_CANDIDATES + 2))),
}


@pytest.mark.parametrize("fields", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_is_invalid_argument_with_a_message(serve: Running, fields: dict) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(serve, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details()
    assert serve.metric("liverec_serving_requests_total", method="Recommend", code="UNKNOWN") == 0


def test_limits_themselves_are_accepted(serve: Running) -> None:
    response = call(serve, user_id=1, k=MAX_K, candidate_item_ids=list(range(1, MAX_CANDIDATES + 1)),
                    exclude_item_ids=[1, 1, 10**12])  # repeated and unknown exclusions are harmless
    assert sorted(items(response)) == list(range(2, MAX_CANDIDATES + 1))


def test_full_catalog_answer_for_a_known_user(serve: Running) -> None:
    response = call(serve, user_id=1, k=10)
    scores = [i.score for i in response.items]
    assert len(response.items) == 10 and len(set(items(response))) == 10
    assert scores == sorted(scores, reverse=True)
    assert all(1 <= i <= N_ITEMS for i in items(response))
    assert not response.cold_start
    assert response.model_version == MODEL_VERSION
    assert response.state_version == HISTORIES[1][2]
    assert response.staleness_ms >= 5_000  # the newest event in user 1's history is 5 s old
    direct = LocalBackend(shared_snapshot()).recommend(shared_snapshot(), [Query(1, 10)])[0]
    assert items(response) == direct.items.tolist()
    np.testing.assert_allclose(scores, direct.scores, rtol=1e-5, atol=1e-6)


def test_unknown_user_gets_a_flagged_cold_start_answer(serve: Running) -> None:
    before = serve.metric("liverec_serving_cold_start_total")
    response = call(serve, user_id=COLD_USER, k=4)
    assert response.cold_start
    assert items(response) == [1, 2, 3, 4]  # the most popular items
    assert response.state_version == -1 and response.staleness_ms == 0
    assert response.model_version == MODEL_VERSION
    assert serve.metric("liverec_serving_cold_start_total") == before + 1
    assert not call(serve, user_id=2, k=4).cold_start


def test_candidates_rank_only_those_items(serve: Running) -> None:
    candidates = [250, 3, 77, 190, 12, 5]
    response = call(serve, user_id=3, k=4, candidate_item_ids=candidates)
    assert len(response.items) == 4 and set(items(response)) <= set(candidates)
    assert not response.cold_start
    everything = call(serve, user_id=3, k=10, candidate_item_ids=candidates + [10**9])  # unknown id: ignored
    assert sorted(items(everything)) == sorted(candidates)
    assert items(everything)[:4] == items(response)


def test_cold_start_orders_candidates_by_popularity(serve: Running) -> None:
    response = call(serve, user_id=COLD_USER, k=3, candidate_item_ids=[200, 9, 150, 40])
    assert response.cold_start and items(response) == [9, 40, 150]


def test_exclusions_and_seen_items_are_never_returned(serve: Running) -> None:
    top = items(call(serve, user_id=1, k=5))
    without = items(call(serve, user_id=1, k=5, exclude_item_ids=top[:2]))
    assert not set(top[:2]) & set(without) and without[:3] == top[2:]
    seen = set(HISTORIES[1][0].tolist())
    unseen = items(call(serve, user_id=1, k=MAX_K, exclude_seen=True))
    assert len(unseen) == MAX_K and not seen & set(unseen)
    cold = items(call(serve, user_id=COLD_USER, k=3, exclude_item_ids=[2], exclude_seen=True))
    assert cold == [1, 3, 4]
    candidates = items(call(serve, user_id=1, k=10, candidate_item_ids=[5, 17, 60, 61], exclude_seen=True,
                            exclude_item_ids=[61]))
    assert candidates == [60]


def test_k_above_the_catalog_returns_what_there_is(serve: Running) -> None:
    assert len(call(serve, user_id=2, k=MAX_K, candidate_item_ids=[1, 2]).items) == 2


def test_reflection_lists_and_describes_the_service(serve: Running) -> None:
    database = ProtoReflectionDescriptorDatabase(serve.channel)
    services = set(database.get_services())
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    service = descriptor_pool.DescriptorPool(database).FindServiceByName(SERVICE_NAME)
    method = service.methods_by_name["Recommend"]
    assert method.input_type.full_name == "liverec.v1.RecommendRequest"
    assert {f.name for f in method.input_type.fields} == {
        "user_id", "k", "candidate_item_ids", "exclude_item_ids", "exclude_seen"}
    assert {f.name for f in method.output_type.fields} == {
        "items", "model_version", "state_version", "staleness_ms", "cold_start"}


def test_health_turns_serving_once_the_backend_is_ready() -> None:
    backend = LocalBackend(None)
    with running(backend) as serve:
        health = health_pb2_grpc.HealthStub(serve.channel)
        for service in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            call(serve, user_id=1, k=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # no model version yet
        backend.publish(shared_snapshot())
        for service in ("", SERVICE_NAME):
            wait_for_health(serve.channel, service, health_pb2.HealthCheckResponse.SERVING)
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        assert call(serve, user_id=1, k=3).model_version == MODEL_VERSION
        assert serve.metric("liverec_serving_requests_total", method="Recommend", code="UNAVAILABLE") == 1
        backend.publish(None)  # e.g. the replica fell behind: no longer ready
        wait_for_health(serve.channel, SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)


def test_port_in_use_is_refused_not_shared(serve: Running) -> None:
    with pytest.raises(RuntimeError, match="Failed to bind"):
        build_server(ServingConfig(port=serve.port, metrics_port=-1), LocalBackend(shared_snapshot()))


def test_metrics_endpoint_exports_the_serving_metrics() -> None:
    with running(LocalBackend(shared_snapshot()), metrics_port=0) as serve:
        call(serve, user_id=COLD_USER, k=2)
        with pytest.raises(grpc.RpcError):
            call(serve, user_id=1, k=0)
        url = f"http://127.0.0.1:{serve.server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=30).read().decode()
    assert 'liverec_serving_request_seconds_count{code="OK",method="Recommend"} 1.0' in text
    assert 'liverec_serving_request_seconds_count{code="INVALID_ARGUMENT",method="Recommend"} 1.0' in text
    assert 'liverec_serving_requests_total{code="INVALID_ARGUMENT",method="Recommend"} 1.0' in text
    assert "liverec_serving_batch_size_count 1.0" in text
    assert "liverec_serving_queue_depth 0.0" in text
    assert "liverec_serving_cold_start_total 1.0" in text
