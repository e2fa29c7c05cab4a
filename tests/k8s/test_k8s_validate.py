"""Every overlay renders with kustomize and every rendered object validates offline: built-in kinds
against the Kubernetes 1.30 OpenAPI schemas (kubernetes-validate, strict), custom resources against
the Strimzi and Prometheus Operator schemas in k8s/schemas/."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest

from tests.k8s.k8s_helpers import KUBERNETES_VERSION, OVERLAYS, SCHEMAS, ValidationFailure, find, overlay, \
    render, validate

EXPECTED_KINDS = {
    "Namespace", "ServiceAccount", "ConfigMap", "Service", "StatefulSet", "Deployment", "PodDisruptionBudget",
    "NetworkPolicy", "Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser", "PodMonitor", "ServiceMonitor",
    "PrometheusRule",
}


@pytest.mark.parametrize("target", ["base", "overlays/dev", "overlays/prod"])
def test_kustomize_renders(target: str) -> None:
    objs = render(target)
    kinds = {o["kind"] for o in objs}
    assert EXPECTED_KINDS - {"KafkaNodePool"} <= kinds, EXPECTED_KINDS - kinds
    names = Counter((o["kind"], o["metadata"]["name"]) for o in objs)
    assert [k for k, n in names.items() if n > 1] == []
    # Everything namespaced lands in the liverec namespace.
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == "liverec", (o["kind"], o["metadata"]["name"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_has_every_kind(name: str) -> None:
    kinds = {o["kind"] for o in overlay(name)}
    assert EXPECTED_KINDS <= kinds, EXPECTED_KINDS - kinds
    assert ("HorizontalPodAutoscaler" in kinds) == (name == "prod")  # dev pins one replica


@pytest.mark.parametrize("target", ["base", "overlays/dev", "overlays/prod"])
def test_every_rendered_object_validates_offline(target: str) -> None:
    failures, against = [], Counter()
    for obj in render(target):
        try:
            against[validate(obj)] += 1
        except ValidationFailure as exc:
            failures.append(str(exc))
    assert failures == []
    # Both kinds of schema were actually used.
    assert against[f"kubernetes {KUBERNETES_VERSION}"] >= 10
    assert sum(n for k, n in against.items() if k.startswith("k8s/schemas/")) >= 8


def test_every_custom_resource_kind_has_a_schema() -> None:
    crs = {(o["apiVersion"], o["kind"]) for name in OVERLAYS for o in overlay(name)
           if o["apiVersion"].split("/")[0].endswith((".strimzi.io", ".coreos.com"))}
    assert crs == {("kafka.strimzi.io/v1", k) for k in ("Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser")} | {
        ("monitoring.coreos.com/v1", k) for k in ("PodMonitor", "ServiceMonitor", "PrometheusRule")}
    for api_version, kind in crs:
        group, version = api_version.split("/")
        schema = json.loads((SCHEMAS / group / f"{kind.lower()}_{version}.json").read_text())
        assert schema["properties"]["spec"]["additionalProperties"] is False


def _mutate(kind: str, name: str | None, change) -> dict:
    obj = copy.deepcopy(find(overlay("prod"), kind, name)[0])
    change(obj)
    return obj


def _set(path: list, value):
    def change(obj):
        node = obj
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


def _delete(path: list):
    def change(obj):
        node = obj
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return change


BROKEN = {
    "Deployment: unknown field": ("Deployment", None, _set(["spec", "replicaz"], 2)),
    "Deployment: containerPort is a string": (
        "Deployment", None, _set(["spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"], "grpc")),
    "StatefulSet: grpc probe without port": (
        "StatefulSet", None, _set(["spec", "template", "spec", "containers", 0, "livenessProbe"], {"grpc": {}})),
    "NetworkPolicy: misplaced field": ("NetworkPolicy", None, _set(["spec", "egres"], [])),
    "Kafka: listener port below 9092": (
        "Kafka", None, _set(["spec", "kafka", "listeners", 0, "port"], 80)),
    "Kafka: listener without tls": ("Kafka", None, _delete(["spec", "kafka", "listeners", 0, "tls"])),
    "Kafka: v1beta2 field removed in v1": ("Kafka", None, _set(["spec", "kafka", "replicas"], 3)),
    "Kafka: ZooKeeper": ("Kafka", None, _set(["spec", "zookeeper"], {"replicas": 3})),
    "KafkaNodePool: unknown role": ("KafkaNodePool", None, _set(["spec", "roles"], ["broker", "zookeeper"])),
    "KafkaNodePool: no storage": ("KafkaNodePool", None, _delete(["spec", "storage"])),
    "KafkaTopic: misspelt partitions": ("KafkaTopic", None, _set(["spec", "partition"], 4)),
    "KafkaTopic: zero partitions": ("KafkaTopic", None, _set(["spec", "partitions"], 0)),
    "KafkaUser: unknown ACL operation": (
        "KafkaUser", None, _set(["spec", "authorization", "acls", 0, "operations"], ["Consume"])),
    "PodMonitor: misspelt interval": ("PodMonitor", None, _set(["spec", "podMetricsEndpoints", 0, "intervall"], "5s")),
    "PodMonitor: bad duration": ("PodMonitor", None, _set(["spec", "podMetricsEndpoints", 0, "interval"], "5 sec")),
    "ServiceMonitor: no selector": ("ServiceMonitor", None, _delete(["spec", "selector"])),
    "PrometheusRule: rule without expr": (
        "PrometheusRule", None, _delete(["spec", "groups", 1, "rules", 0, "expr"])),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validation_rejects_broken_objects(case: str) -> None:
    kind, name, change = BROKEN[case]
    original = find(overlay("prod"), kind, name)[0]
    validate(original)  # the unbroken object passes...
    with pytest.raises(ValidationFailure):
        validate(_mutate(kind, name, change))  # ...and the broken one does not


def test_objects_of_unknown_kinds_fail_validation() -> None:
    with pytest.raises(ValidationFailure, match="no schema"):
        validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}})
