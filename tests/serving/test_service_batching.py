"""Queueing for real: batches, a full queue, deadlines in the queue, internal errors and the SIGTERM drain.

The backend is the real one slowed down: its `recommend` waits on a threading.Event the test
holds, so requests pile up in the server's queue exactly as they would behind a busy device.
"""

from __future__ import annotations

import os
import signal
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from liverec.serving.backend import Query
from liverec.serving.service import serve_until_signalled
from liverec.v1 import recommender_pb2 as pb
from tests.serving.service_harness import (
    COLD_USER, HISTORIES, LocalBackend, Running, running, shared_snapshot, wait_for, wait_for_health,
)


def slowed_backend(histories: dict = HISTORIES) -> LocalBackend:
    backend = LocalBackend(shared_snapshot(), histories)
    backend.gate = threading.Event()
    return backend


def send(serve: Running, user_id: int, k: int = 3, timeout: float = 30) -> grpc.Future:
    return serve.stub.Recommend.future(pb.RecommendRequest(user_id=user_id, k=k), timeout=timeout)


def queue_depth(serve: Running) -> float:
    return serve.metric("liverec_serving_queue_depth")


def test_concurrent_requests_are_scored_in_one_batch_with_their_own_answers() -> None:
    backend = slowed_backend()
    with running(backend, max_batch=8, max_wait_ms=2.0) as serve:
        first = send(serve, COLD_USER)
        wait_for(backend.entered.is_set, "the first batch to reach the backend")
        users = [1, 2, 3, COLD_USER, 1]
        queued = [send(serve, u, k=5) for u in users]
        wait_for(lambda: queue_depth(serve) == len(users), "the requests to queue behind the busy backend")
        backend.gate.set()
        responses = [f.result() for f in [first, *queued]]
        assert serve.metric("liverec_serving_batch_size_count") == 2
        assert serve.metric("liverec_serving_batch_size_sum") == 1 + len(users)
        assert serve.metric("liverec_serving_batch_size_bucket", le="4.0") == 1  # the other batch held 5
        assert queue_depth(serve) == 0
    reference = LocalBackend(shared_snapshot())
    for user, response in zip(users, responses[1:]):
        direct = reference.recommend(shared_snapshot(), [Query(user, 5)])[0]
        assert [i.item_id for i in response.items] == direct.items.tolist(), user
        np.testing.assert_allclose([i.score for i in response.items], direct.scores, rtol=1e-5, atol=1e-6)
        assert response.cold_start == (user == COLD_USER)


def test_full_queue_is_refused_with_resource_exhausted() -> None:
    backend = slowed_backend()
    with running(backend, max_batch=1, max_queue=1) as serve:
        busy = send(serve, 1)
        wait_for(backend.entered.is_set, "the backend to be busy")
        waiting = send(serve, 2)
        wait_for(lambda: queue_depth(serve) == 1, "one request waiting")
        with pytest.raises(grpc.RpcError) as err:
            serve.stub.Recommend(pb.RecommendRequest(user_id=3, k=3), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue" in err.value.details()
        backend.gate.set()
        assert busy.result().items and waiting.result().items  # the accepted ones are still answered
        assert serve.metric("liverec_serving_requests_total", method="Recommend", code="RESOURCE_EXHAUSTED") == 1
    assert [q.user_id for q in backend.scored] == [1, 2]


def test_deadline_passing_in_the_queue_is_exceeded_and_never_scored() -> None:
    backend = slowed_backend()
    with running(backend, max_batch=1) as serve:
        busy = send(serve, 1)
        wait_for(backend.entered.is_set, "the backend to be busy")
        late = send(serve, 2, timeout=1.0)
        wait_for(lambda: queue_depth(serve) == 1, "the short-deadline request to queue")
        assert late.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
        backend.gate.set()
        after = serve.stub.Recommend(pb.RecommendRequest(user_id=3, k=3), timeout=30)
        assert busy.result().items and after.items
        wait_for(lambda: serve.metric("liverec_serving_requests_total", method="Recommend",
                                      code="DEADLINE_EXCEEDED") == 1, "the server to count the expired request")
    assert [q.user_id for q in backend.scored] == [1, 3]  # user 2's request was dropped, not scored


def test_backend_failure_is_internal_with_a_message() -> None:
    # A corrupt history (fewer actions than items) makes the real encoder fail for user 9.
    histories = {**HISTORIES, 9: (np.array([1, 2, 3]), np.array([1, 1], np.int8), 5, 0)}
    with running(LocalBackend(shared_snapshot(), histories)) as serve:
        with pytest.raises(grpc.RpcError) as err:
            serve.stub.Recommend(pb.RecommendRequest(user_id=9, k=3), timeout=30)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "scoring failed" in err.value.details()
        assert serve.stub.Recommend(pb.RecommendRequest(user_id=1, k=3), timeout=30).items  # still serving


def test_sigterm_drains_queued_and_in_flight_requests_then_stops() -> None:
    backend = slowed_backend()
    outcome: dict[str, object] = {}
    signalled = threading.Event()

    def terminate() -> None:
        if not signalled.is_set():
            signalled.set()
            os.kill(os.getpid(), signal.SIGTERM)

    def client_side(serve: Running) -> None:
        """Runs beside the main thread, which sits in serve_until_signalled until SIGTERM."""
        try:
            watch = health_pb2_grpc.HealthStub(serve.channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            in_flight = send(serve, 1)
            wait_for(backend.entered.is_set, "the backend to be busy")
            queued = send(serve, 2)
            wait_for(lambda: queue_depth(serve) == 1, "a queued request")
            terminate()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # open calls see the drain
            watch.cancel()
            with pytest.raises(grpc.RpcError) as err:
                serve.stub.Recommend(pb.RecommendRequest(user_id=3, k=3), timeout=30)
            outcome["refused"] = err.value.code()
            backend.gate.set()
            outcome["answers"] = [len(in_flight.result().items), len(queued.result().items)]
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc
        finally:
            backend.gate.set()
            terminate()

    previous = signal.getsignal(signal.SIGTERM)
    with running(backend, max_batch=1, drain_s=30.0) as serve:
        wait_for_health(serve.channel, "", health_pb2.HealthCheckResponse.SERVING)
        helper = threading.Thread(target=client_side, args=(serve,))
        helper.start()
        serve_until_signalled(serve.server)
        helper.join()
        assert "error" not in outcome, outcome.get("error")
        assert outcome["refused"] == grpc.StatusCode.UNAVAILABLE
        assert outcome["answers"] == [3, 3]
        assert not serve.server.wait_for_termination(timeout=30)  # False: terminated, not timed out
    assert [q.user_id for q in backend.scored] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is previous
