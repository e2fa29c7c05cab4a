"""Several serving workers behind one port: config rules, the port shared for real, the supervisor.

The workers of a replica bind the same port with SO_REUSEPORT and the kernel spreads
connections over them; a lone replica still refuses a port in use (test_service.py).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from liverec.platform.broker import free_port, free_ports
from liverec.platform.config import ConfigError, LiverecConfig, ServingConfig
from liverec.platform.datasets import load_dataset
from liverec.serving.process import worker_config
from liverec.serving.service import build_server
from liverec.trainer.worker import TrainerWorker
from liverec.v1 import recommender_pb2 as pb
from liverec.v1 import recommender_pb2_grpc
from tests.serving.service_harness import LocalBackend, shared_snapshot
from tests.trainer.conftest import publish_ml100k, small


def test_workers_need_a_fixed_port_and_a_positive_count() -> None:
    with pytest.raises(ConfigError, match="serving.workers"):
        ServingConfig(workers=0)
    with pytest.raises(ConfigError, match="serving.workers"):
        ServingConfig(workers=2, port=0)
    assert ServingConfig(workers=2, port=50100).workers == 2


def test_each_worker_gets_its_own_state_dir_and_metrics_port() -> None:
    config = LiverecConfig(serving=ServingConfig(workers=3, port=50100, metrics_port=9500, state_dir="runs/s"))
    got = [worker_config(config, i).serving for i in range(3)]
    assert [s.state_dir for s in got] == ["runs/s/worker-0", "runs/s/worker-1", "runs/s/worker-2"]
    assert [s.metrics_port for s in got] == [9500, 9501, 9502]
    assert {s.port for s in got} == {50100}
    no_metrics = LiverecConfig(serving=ServingConfig(workers=2, port=50100, metrics_port=-1))
    assert worker_config(no_metrics, 1).serving.metrics_port == -1


def test_workers_share_one_port_and_both_answer() -> None:
    port = free_port()
    config = ServingConfig(port=port, metrics_port=-1, workers=2)
    servers = [build_server(config, LocalBackend(shared_snapshot()))[0] for _ in range(2)]
    for server in servers:
        server.start()
    channels = []
    try:
        # Separate connections (a channel option makes each one its own subchannel pool).
        for i in range(24):
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1),
                                                                          ("liverec.test.channel", i)])
            channels.append(channel)
            answer = recommender_pb2_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(user_id=1, k=3),
                                                                            timeout=30)
            assert len(answer.items) == 3
        served = [s.registry.get_sample_value("liverec_serving_requests_total",
                                              {"method": "Recommend", "code": "OK"}) or 0.0 for s in servers]
        assert sum(served) == 24
        assert all(n > 0 for n in served), served  # 24 connections all on one socket: ~1 in 8 million
    finally:
        for channel in channels:
            channel.close()
        for server in servers:
            server.stop(1.0).wait(10)


@pytest.mark.slow
def test_liverec_serve_runs_workers_that_all_serve_and_stop_together(config, cli_env, ml100k, tmp_path) -> None:
    publish_ml100k(config, ml100k, 600)
    TrainerWorker(small(config, tmp_path / "trainer", publish_every_s=0.2)).run(idle_exit_s=2)
    port, metrics, _ = free_ports(3)  # worker i serves /metrics on metrics + i
    env = {**cli_env, "LIVEREC_MODEL__ENCODER__DIM": "16", "LIVEREC_MODEL__ENCODER__LAYERS": "1",
           "LIVEREC_MODEL__ENCODER__HEADS": "1", "LIVEREC_MODEL__ENCODER__MAX_LEN": "10",
           "LIVEREC_SERVING__READY_MAX_LAG": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "liverec.platform", "serve", "--port", str(port), "--workers", "2",
                             "--state-dir", str(tmp_path / "serving"), "--metrics-port", str(metrics),
                             "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        user = int(load_dataset(str(ml100k)).table.user_id[0])
        for index in range(2):  # each worker materialised the changelogs itself and is ready
            wait_until(lambda i=index: "liverec_serving_ready 1.0" in scrape(metrics + i), f"worker {index} ready")
        for i in range(8):
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1),
                                                                          ("liverec.test.channel", i)])
            with channel:
                answer = recommender_pb2_grpc.RecommenderStub(channel).Recommend(
                    pb.RecommendRequest(user_id=user, k=5), timeout=30)
                assert len(answer.items) == 5 and not answer.cold_start
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    except AssertionError:
        proc.kill()
        raise AssertionError(f"serve output:\n{proc.communicate()[1][-4000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not is_taken(port) and not is_taken(metrics) and not is_taken(metrics + 1)


def is_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


def wait_until(condition, what: str, limit_s: float = 90.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)
