"""The PrometheusRule and the Grafana dashboard: promtool checks and unit-tests the rules (every alert
fires and stays silent in its cases), every dashboard query parses, the dashboard ships in a
ConfigMap the Grafana sidecar picks up, and the PromQL metric-name reader used by the live test
reads what it should."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from tests.k8s.k8s_helpers import DASHBOARD, OVERLAYS, RULES_TESTS, configmap, dashboard, dashboard_exprs, \
    dashboard_panels, metric_names, one, overlay, promtool, rules, rules_spec, write_rules


def alerts() -> list[str]:
    return [r["alert"] for r in rules() if "alert" in r]


def test_promtool_check_rules(tmp_path: Path) -> None:
    write_rules(tmp_path)
    out = promtool("check", "rules", str(tmp_path / "liverec.rules.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_check_rules_rejects_a_broken_expression(tmp_path: Path) -> None:
    spec = copy.deepcopy(rules_spec())
    spec["groups"][0]["rules"][0]["expr"] = "sum by (namespace) (rate(liverec_trainer_events_consumed_total[5m])"
    write_rules(tmp_path, spec)
    assert promtool("check", "rules", str(tmp_path / "liverec.rules.yaml")).returncode != 0


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    tests = write_rules(tmp_path)
    out = promtool("test", "rules", tests.name, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_the_issue_s_alerts_exist() -> None:
    names = set(alerts())
    # consumer lag, state staleness, Recommend p99, DLQ rate, checkpoint age, serving not ready
    assert {"LiverecTrainerConsumerLagHigh", "LiverecServingStateStale", "LiverecRecommendLatencyHigh",
            "LiverecDeadLetterRateHigh", "LiverecTrainerCheckpointStale", "LiverecServingReplicaNotReady",
            "LiverecServingUnavailable"} <= names
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        else:
            assert rule["record"].startswith("liverec:")


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    cases: dict[str, list[bool]] = {}
    for test in yaml.safe_load(RULES_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
    for name in alerts():
        assert True in cases.get(name, []), f"{name}: no case where it fires"
        assert False in cases.get(name, []), f"{name}: no case where it stays silent"
    assert set(cases) == set(alerts())


@pytest.mark.parametrize("alert", alerts())
def test_unit_tests_catch_an_alert_that_never_fires(alert: str, tmp_path: Path) -> None:
    spec = copy.deepcopy(rules_spec())
    for rule in (r for g in spec["groups"] for r in g["rules"]):
        if rule.get("alert") == alert:
            rule["expr"] = "vector(1) == 2"
    tests = write_rules(tmp_path, spec)
    out = promtool("test", "rules", tests.name, cwd=tmp_path)
    assert out.returncode != 0, f"the unit tests do not notice {alert} never firing"


@pytest.mark.parametrize("alert", alerts())
def test_unit_tests_catch_an_alert_that_fires_too_early(alert: str, tmp_path: Path) -> None:
    spec = copy.deepcopy(rules_spec())
    for rule in (r for g in spec["groups"] for r in g["rules"]):
        if rule.get("alert") == alert:
            rule["for"] = "0s"
    tests = write_rules(tmp_path, spec)
    out = promtool("test", "rules", tests.name, cwd=tmp_path)
    assert out.returncode != 0, f"the unit tests do not notice {alert} firing without waiting for its `for`"


def test_recording_rules_used_anywhere_are_defined() -> None:
    records = {r["record"] for r in rules() if "record" in r}
    used = set()
    for rule in rules():
        used |= metric_names(str(rule["expr"]))
    for expr in dashboard_exprs(dashboard()):
        used |= metric_names(expr)
    assert {n for n in used if ":" in n} <= records


# -- the dashboard ----------------------------------------------------------------------------


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    exprs = dashboard_exprs(dashboard())
    assert len(exprs) >= 25
    spec = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}:x", "expr": e}
                                                       for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_structure() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] == "liverec"
    panels = list(dashboard_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
    for p in graphs:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"], p["title"]
    # No two panels overlap.
    cells = set()
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    # The whole data flow is on it: Kafka in, training, checkpoints, parameters, serving.
    names = set().union(*(metric_names(e) for e in dashboard_exprs(dash)))
    for needed in ("liverec:trainer_events_consumed:rate5m", "liverec:trainer_events_dead_lettered:rate5m",
                   "liverec_trainer_consumer_lag", "liverec_trainer_loss", "liverec_trainer_prequential_hr10",
                   "liverec_store_stat", "liverec_trainer_checkpoint_age_seconds", "liverec_trainer_model_version",
                   "liverec_serving_params_version", "liverec_serving_request_seconds_bucket",
                   "liverec_serving_state_staleness_seconds_bucket", "liverec_serving_queue_depth",
                   "liverec_serving_ready", "liverec_trainer_resident_bytes"):
        assert needed in names, needed


@pytest.mark.parametrize("name", OVERLAYS)
def test_dashboard_ships_in_a_configmap_for_the_grafana_sidecar(name: str) -> None:
    cm = one(overlay(name), "ConfigMap", "liverec-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["liverec.json"]) == json.loads(DASHBOARD.read_text())
    assert configmap(overlay(name), "liverec-config")["metadata"].get("labels", {}).get("grafana_dashboard") is None


# -- the PromQL reader ------------------------------------------------------------------------


@pytest.mark.parametrize("expr,names", [
    ('sum by (namespace) (rate(liverec_trainer_events_consumed_total[5m]))', {"liverec_trainer_events_consumed_total"}),
    ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{method="Recommend", x=~"a|b"}[5m])))', {"a_bucket"}),
    ('x > 600 and on (namespace, instance) sum by (namespace, instance) (rate(y[10m])) > 0', {"x", "y"}),
    ('absent(liverec_trainer_model_version)', {"liverec_trainer_model_version"}),
    ('sum(a) by (le) / ignoring(code) group_left sum(b:rate5m{le="+Inf"}) * 1e-3', {"a", "b:rate5m"}),
    ('max_over_time(c[5m:30s]) offset 1h unless d{label="sum(e)"} == bool 1', {"c", "d"}),
    ('max(liverec_trainer_last_checkpoint_timestamp_seconds{namespace=~".*"}) * 1000',
     {"liverec_trainer_last_checkpoint_timestamp_seconds"}),
])
def test_metric_names_reads_selectors_only(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
