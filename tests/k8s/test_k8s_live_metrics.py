"""A real scrape: Debian's Prometheus server on 127.0.0.1 scrapes a running trainer and a running
serving replica during a short replay, with liverec's recording and alerting rules loaded.

One module-scoped scenario: the trainer (in this process) and a `liverec serve` replica (a child
process) start against the session broker; Prometheus starts with a 1 s scrape and evaluation
interval and sees the trainer idle (events applied: 0); the replay publishes ml-100k events plus a
few undecodable records; the replica becomes ready and answers Recommend calls. The tests then read
Prometheus' HTTP API and each process's /metrics. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from liverec.platform.broker import LocalBroker, free_port, free_ports
from liverec.platform.config import LiverecConfig, TopicsConfig
from liverec.platform.datasets import load_dataset
from liverec.platform.kafka import ensure_topics, make_producer
from liverec.trainer.worker import TrainerWorker
from liverec.v1 import recommender_pb2, recommender_pb2_grpc
from tests.k8s.k8s_helpers import container, dashboard, dashboard_exprs, metric_names, one, overlay, rules, \
    rules_spec, tool
from tests.trainer.conftest import publish_ml100k, small

EVENTS = 600
BAD_RECORDS = 3
NAMESPACE = "liverec-live"  # the target label the Prometheus Operator would add
WAIT_S = 240.0  # upper bound on any one wait below; a wait that runs out fails with its reason
SMALL_MODEL_ENV = {"LIVEREC_MODEL__ENCODER__DIM": "16", "LIVEREC_MODEL__ENCODER__LAYERS": "1",
                   "LIVEREC_MODEL__ENCODER__HEADS": "1", "LIVEREC_MODEL__ENCODER__MAX_LEN": "10"}
# The liverec processes whose /metrics the rules and the dashboard may name; each is started below.
LIVE_PROCESSES = ("trainer", "serving")
# Grafana and Prometheus provide these themselves; no process exports them.
SYNTHETIC_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def wait_for(what: str, fn: Callable[[], Any], check: Callable[[], None] | None = None,
             timeout_s: float = WAIT_S) -> Any:
    """Poll `fn` until it returns something truthy; fail naming `what` if it never does."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        if check is not None:
            check()
        try:
            value = fn()
            if value:
                return value
        except (OSError, grpc.RpcError, KeyError, ValueError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} (last error: {last_error!r})")
        time.sleep(0.25)


class Prometheus:
    """A Prometheus server on 127.0.0.1 with liverec's rules, scraping the given targets every second."""

    def __init__(self, directory: Path, targets: dict[str, str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        rules_path = directory / "liverec.rules.yaml"
        rules_path.write_text(yaml.safe_dump(rules_spec(), sort_keys=False))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules_path)],
            "scrape_configs": [{"job_name": f"liverec-{name}",
                                "static_configs": [{"targets": [address], "labels": {"namespace": NAMESPACE}}]}
                               for name, address in targets.items()],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / "prometheus.log"
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={directory / 'prometheus.yml'}",
             f"--storage.tsdb.path={directory / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        wait_for("Prometheus to be ready", lambda: urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200,
                 self.check)

    def check(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        return [(r["metric"], float(r["value"][1])) for r in self.api("query", query=expr)["result"]]

    def value(self, expr: str) -> float | None:
        """The single value of `expr` now, None when it has no sample."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} has {len(result)} series: {result}"
        return result[0][1] if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def probe_services() -> dict[str, str]:
    """The grpc.health.v1 service each probe of the prod serving Deployment asks about."""
    ctr = container(one(overlay("prod"), "Deployment", "liverec-serving"), "serving")
    return {probe: ctr[probe]["grpc"].get("service", "") for probe in ("startupProbe", "readinessProbe", "livenessProbe")}


def health_status(channel: grpc.Channel, service: str) -> str:
    """What the kubelet's gRPC probe gets for `service`: a serving status, or the RPC's error code."""
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


@dataclass
class Live:
    prometheus: Prometheus
    started: float  # unix time before Prometheus' first scrape
    metrics: dict[str, str] = field(default_factory=dict)  # process -> /metrics text at the end
    health_before_ready: dict[str, str] = field(default_factory=dict)
    health_after_ready: dict[str, str] = field(default_factory=dict)
    answered: int = 0
    cold_starts: int = 0


def _config(broker: LocalBroker, state_dir: Path) -> LiverecConfig:
    prefix = f"k8s{uuid.uuid4().hex[:8]}"
    base = LiverecConfig()
    topics = TopicsConfig(events=f"{prefix}.events", dlq=f"{prefix}.events.dlq", user_state=f"{prefix}.user-state",
                          params=f"{prefix}.params", partitions=4)
    config = dataclasses.replace(base, kafka=dataclasses.replace(base.kafka, bootstrap_servers=broker.bootstrap),
                                 topics=topics)
    return small(config, state_dir, publish_every_s=0.2)


@pytest.fixture(scope="module")
def live(broker: LocalBroker, ml100k: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("live-metrics")
    cfg = _config(broker, tmp / "trainer")
    ensure_topics(cfg.kafka, cfg.topics)

    # The trainer, in this process, until told to stop.
    stop = threading.Event()
    worker = TrainerWorker(cfg, stop=stop)
    failure: list[BaseException] = []

    def train() -> None:
        try:
            worker.run()
        except BaseException as exc:  # reported by check() in the waits below
            failure.append(exc)

    thread = threading.Thread(target=train, name="live-trainer", daemon=True)
    thread.start()

    # A serving replica: `liverec serve`, as the Deployment runs it (metrics on 127.0.0.1 here).
    grpc_port, serving_metrics_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEREC_")}
    env.update(SMALL_MODEL_ENV, PYTHONUNBUFFERED="1", LIVEREC_KAFKA__BOOTSTRAP_SERVERS=cfg.kafka.bootstrap_servers,
               LIVEREC_TOPICS__EVENTS=cfg.topics.events, LIVEREC_TOPICS__DLQ=cfg.topics.dlq,
               LIVEREC_TOPICS__USER_STATE=cfg.topics.user_state, LIVEREC_TOPICS__PARAMS=cfg.topics.params,
               LIVEREC_TOPICS__PARTITIONS=str(cfg.topics.partitions), LIVEREC_SERVING__READY_MAX_LAG="0")
    serving_log = tmp / "serving.log"
    serving = subprocess.Popen(
        [sys.executable, "-m", "liverec.platform", "serve", "--port", str(grpc_port), "--state-dir",
         str(tmp / "serving"), "--metrics-port", str(serving_metrics_port), "--device", "cpu"],
        env=env, stdout=serving_log.open("w"), stderr=subprocess.STDOUT)

    def check() -> None:
        if failure:
            raise failure[0]
        if serving.poll() is not None:
            pytest.fail(f"liverec serve exited with {serving.returncode}:\n{serving_log.read_text()[-3000:]}")

    prometheus: Prometheus | None = None
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        wait_for("the trainer's metrics endpoint", lambda: worker.metrics_port, check)
        endpoints = {"trainer": f"127.0.0.1:{worker.metrics_port}", "serving": f"127.0.0.1:{serving_metrics_port}"}
        assert set(endpoints) == set(LIVE_PROCESSES)
        for name, address in endpoints.items():
            wait_for(f"{name} /metrics", lambda a=address: urllib.request.urlopen(f"http://{a}/metrics", timeout=2),
                     check)
        started = time.time()
        prometheus = Prometheus(tmp / "prometheus", endpoints)
        result = Live(prometheus=prometheus, started=started)
        # Prometheus has seen both processes before any event exists.
        wait_for("a first scrape of the idle trainer",
                 lambda: prometheus.value("liverec_trainer_events_applied_total") == 0.0, check)
        wait_for("a first scrape of the replica", lambda: prometheus.value("liverec_serving_ready") is not None, check)
        result.health_before_ready = {s: health_status(channel, s) for s in probe_services().values()}

        # The replay, plus a few records the trainer must dead-letter.
        publish_ml100k(cfg, ml100k, EVENTS)
        producer = make_producer(cfg.kafka)
        for i in range(BAD_RECORDS):
            producer.send(cfg.topics.events, key=str(i).encode(), value=b"\xff\xfe not a UserEvent")
        producer.flush()
        producer.close()
        wait_for(f"the trainer to apply {EVENTS} events",
                 lambda: worker.counters.applied == EVENTS and worker.counters.consumed == EVENTS + BAD_RECORDS, check)

        # The replica catches up and answers: known users (state hits) and an unknown one (cold start).
        wait_for("the replica to report SERVING", lambda: health_status(channel, "") == "SERVING", check)
        result.health_after_ready = {s: health_status(channel, s) for s in probe_services().values()}
        stub = recommender_pb2_grpc.RecommenderStub(channel)

        def recommend(user: int) -> recommender_pb2.RecommendResponse:
            reply = stub.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=10), timeout=10)
            result.answered += 1
            result.cold_starts += reply.cold_start
            return reply

        users = list(dict.fromkeys(int(u) for u in load_dataset(str(ml100k)).table.user_id[:EVENTS]))[:20]
        wait_for("every replayed user answered from user state",
                 lambda: all([not recommend(user).cold_start for user in users]), check)
        # Two rounds, with a scrape in between: a counter's first scraped sample is its baseline,
        # so rates need increases Prometheus sees after the series first appears.
        for _ in range(2):
            known = [recommend(user) for user in users]
            unknown = [recommend(user) for user in (10**12, 10**12 + 1)]
            assert all(r.cold_start for r in unknown) and not any(r.cold_start for r in known)
            wait_for("Prometheus to see the Recommend calls",
                     lambda: prometheus.value('sum(liverec_serving_requests_total{method="Recommend"})')
                     == result.answered, check)

        # Prometheus holds the final values, and the rules have evaluated on them.
        wait_for("Prometheus to see every applied event",
                 lambda: prometheus.value("liverec_trainer_events_applied_total") == EVENTS, check)
        wait_for("the recording rules to evaluate",
                 lambda: (prometheus.value("liverec:serving_requests:rate5m") or 0) > 0, check)
        for name, address in endpoints.items():
            result.metrics[name] = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
        yield result
    finally:
        channel.close()
        stop.set()
        thread.join(timeout=120)
        serving.terminate()
        try:
            serving.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serving.kill()
            serving.wait()
        if prometheus is not None:
            prometheus.stop()


def exported(text: str) -> dict[str, float]:
    """Sample name -> the sum of its values over all label sets, from a /metrics body."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def referenced_metrics() -> dict[str, set[str]]:
    """Metric name -> where it is named (rule record/alert names, 'dashboard')."""
    where: dict[str, set[str]] = {}
    for rule in rules():
        for name in metric_names(str(rule["expr"])):
            where.setdefault(name, set()).add(rule.get("record") or rule["alert"])
    for expr in dashboard_exprs(dashboard()):
        for name in metric_names(expr):
            where.setdefault(name, set()).add("dashboard")
    return where


# -- the tests --------------------------------------------------------------------------------


def test_every_metric_in_the_rules_and_the_dashboard_is_exported_by_a_live_process(live: Live) -> None:
    records = {r["record"] for r in rules() if "record" in r}
    samples = {process: exported(text) for process, text in live.metrics.items()}
    assert set(samples) == set(LIVE_PROCESSES)
    where = referenced_metrics()
    missing = {name: sorted(uses) for name, uses in where.items()
               if name not in records and name not in SYNTHETIC_SERIES
               and not any(name in s for s in samples.values())}
    assert missing == {}, f"named in PromQL but exported by no live process: {missing}"
    # Each name comes from the process it is named after.
    for name in where:
        if name.startswith(("liverec_trainer_", "liverec_store_")):
            assert name in samples["trainer"], name
        elif name.startswith("liverec_serving_"):
            assert name in samples["serving"], name
    assert len([n for n in where if n not in records]) >= 25


def test_prometheus_scraped_the_trainer_during_the_replay(live: Live) -> None:
    prom = live.prometheus
    series = prom.api("query_range", query="liverec_trainer_events_applied_total", start=live.started,
                      end=time.time(), step="1s")["result"]
    assert len(series) == 1
    values = [float(v) for _, v in series[0]["values"]]
    assert values[0] == 0.0 and values[-1] == EVENTS  # seen before and after the replay
    assert values == sorted(values)
    assert prom.value("liverec_trainer_events_consumed_total") == EVENTS + BAD_RECORDS
    assert prom.value('liverec_trainer_events_dead_lettered_total{reason="undecodable"}') == BAD_RECORDS
    for expr in ("liverec_trainer_prequential_scored_total", "sum(liverec_trainer_batch_seconds_count)",
                 "liverec_trainer_checkpoint_seconds_count", "liverec_trainer_model_version",
                 'liverec_store_stat{table="item", stat="rows"}', "liverec_trainer_last_checkpoint_timestamp_seconds",
                 "liverec_trainer_loss", "liverec_trainer_checkpoint_age_seconds"):
        value = prom.value(expr)
        assert value is not None and value > 0, (expr, value)
    lag = prom.query("liverec_trainer_consumer_lag")
    assert {labels["partition"] for labels, _ in lag} == {"0", "1", "2", "3"}
    # Every series carries the target labels the alerts aggregate by.
    assert all(labels["namespace"] == NAMESPACE and labels["instance"] for labels, _ in lag)


def test_prometheus_scraped_the_serving_replica(live: Live) -> None:
    prom = live.prometheus
    assert prom.value("liverec_serving_ready") == 1.0
    assert prom.value('sum(liverec_serving_requests_total{method="Recommend", code="OK"})') == live.answered
    assert prom.value('sum(liverec_serving_request_seconds_count{method="Recommend"})') == live.answered
    assert prom.value("liverec_serving_cold_start_total") == live.cold_starts
    for expr in ("liverec_serving_params_version", "liverec_serving_batch_size_count",
                 'liverec_serving_state_lookups_total{result="hit"}', "liverec_serving_state_staleness_seconds_count"):
        value = prom.value(expr)
        assert value is not None and value > 0, (expr, value)


def test_the_rules_evaluate_without_errors_on_the_live_series(live: Live) -> None:
    prom = live.prometheus
    groups = prom.api("rules")["groups"]
    loaded = [r for g in groups for r in g["rules"]]
    assert len(loaded) == len(rules())
    assert [r["name"] for r in loaded if r["health"] != "ok"] == []
    for expr in ("liverec:trainer_events_consumed:rate5m", "liverec:trainer_events_applied:rate5m",
                 'liverec:serving_requests:rate5m{code="OK"}',
                 'liverec:serving_request_seconds:p99_5m{method="Recommend"}'):
        value = wait_for(f"{expr} > 0", lambda e=expr: (v := prom.value(e)) and v > 0 and v)
        assert value > 0
    for expr in ("liverec:trainer_consumer_lag:sum", "liverec:trainer_prequential_hr10:ratio_rate15m",
                 "liverec:trainer_prequential_ndcg10:ratio_rate15m", "liverec:serving_state_lookups:rate5m"):
        assert prom.query(expr), f"{expr} has no series"
    # With a trainer and a ready replica scraped, no alert is firing.
    firing = [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []


def test_serving_health_answers_what_the_kubernetes_probes_ask(live: Live) -> None:
    """The serving Deployment's gRPC probes, asked of a real replica before and after it caught up.

    readiness (service ""): NOT_SERVING while catching up, SERVING once caught up;
    startup and liveness (service "liveness"): SERVING whenever the server runs, caught up or not,
    otherwise a lagging replica would be restarted instead of only taken out of the Service.
    """
    probes = probe_services()
    assert probes["readinessProbe"] != probes["livenessProbe"]
    assert live.health_before_ready[probes["readinessProbe"]] == "NOT_SERVING"
    assert live.health_after_ready[probes["readinessProbe"]] == "SERVING"
    for probe in ("startupProbe", "livenessProbe"):
        assert live.health_before_ready[probes[probe]] == "SERVING", (probe, live.health_before_ready)
        assert live.health_after_ready[probes[probe]] == "SERVING", (probe, live.health_after_ready)


def test_prometheus_runs_on_loopback_only(live: Live) -> None:
    cmdline = Path(f"/proc/{live.prometheus.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert f"--web.listen-address=127.0.0.1:{live.prometheus.port}".encode() in cmdline
