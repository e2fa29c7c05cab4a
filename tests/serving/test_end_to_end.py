"""Trainer and a separate serving process through the real broker: state and params flow to Recommend."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from liverec.platform.broker import free_port
from liverec.platform.datasets import load_dataset
from liverec.platform.events import encode_event
from liverec.platform.kafka import make_producer
from liverec.trainer.worker import TrainerWorker
from liverec.v1 import events_pb2, recommender_pb2, recommender_pb2_grpc
from tests.trainer.conftest import publish_ml100k, small


def recommend(stub, user: int, k: int = 10) -> recommender_pb2.RecommendResponse:
    return stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=k), timeout=10)


def wait_until(fn, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = fn()
            if value:
                return value
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.2)


@pytest.mark.slow
def test_served_state_includes_a_new_event_after_the_trainer_learns_it(config, cli_env, ml100k, tmp_path) -> None:
    publish_ml100k(config, ml100k, 1200)
    cfg = small(config, tmp_path / "trainer", publish_every_s=0.2)
    worker = TrainerWorker(cfg)
    worker.run(idle_exit_s=2)

    port = free_port()
    env = {**cli_env, "LIVEREC_MODEL__ENCODER__DIM": "16", "LIVEREC_MODEL__ENCODER__LAYERS": "1",
           "LIVEREC_MODEL__ENCODER__HEADS": "1", "LIVEREC_MODEL__ENCODER__MAX_LEN": "10",
           "LIVEREC_SERVING__READY_MAX_LAG": "0"}
    server = subprocess.Popen([sys.executable, "-m", "liverec.platform", "serve", "--port", str(port),
                               "--state-dir", str(tmp_path / "serving"), "--metrics-port", "-1", "--device", "cpu"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        user = int(load_dataset(str(ml100k)).table.user_id[0])  # in the replayed events, by construction
        # A replica answers from its first complete version on, and reports SERVING only once
        # caught up (ready_max_lag 0): from then on it holds the trainer's last version.
        health = health_pb2_grpc.HealthStub(channel)
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                   == health_pb2.HealthCheckResponse.SERVING)
        first = wait_until(lambda: (r := recommend(stub, user)) and not r.cold_start and r)
        assert len(first.items) == 10
        assert first.model_version == worker.learner.version

        # A new event for that user: once the trainer learns it, a later answer's state includes it.
        producer = make_producer(cfg.kafka)
        producer.send(cfg.topics.events, key=str(user).encode(),
                      value=encode_event(user, 50, events_pb2.ACTION_CLICK, float("nan"), int(time.time() * 1000)))
        producer.flush()
        producer.close()
        TrainerWorker(cfg).run(idle_exit_s=2)
        newer = wait_until(lambda: (r := recommend(stub, user)) and r.state_version > first.state_version and r)
        assert not newer.cold_start and newer.model_version > first.model_version
        assert recommend(stub, 10**12).cold_start  # unknown users get popular items, flagged
    finally:
        server.terminate()
        server.wait(timeout=30)
