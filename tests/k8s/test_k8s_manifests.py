"""What the rendered manifests must mean, beyond schema validity: security contexts, probes, the
overlays' sizes, the configuration liverec itself loads from them, topics and ACLs that match the
data flow, selectors that select, and network policies that allow exactly the data flow."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

import pytest

from liverec.platform.config import LiverecConfig, load_config
from liverec.platform.kafka import topic_specs
from tests.k8s.k8s_helpers import OVERLAYS, container, find, one, overlay, pod_templates, \
    selector_matches

NAMESPACE = "liverec"
KAFKA = "liverec"  # the Strimzi Kafka cluster's name
# Secrets the operators create: Strimzi's cluster CA and the User Operator's one per KafkaUser.
OPERATOR_SECRETS = {f"{KAFKA}-cluster-ca-cert"}


def trainer(objs) -> dict[str, Any]:
    return one(objs, "StatefulSet", "liverec-trainer")


def serving(objs) -> dict[str, Any]:
    return one(objs, "Deployment", "liverec-serving")


def port(ctr: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in ctr.get("ports", [])}
    assert name in ports, f"container {ctr['name']} has no port named {name}"
    return ports[name]


# -- the configuration liverec loads from what the pods get -------------------------------------


def effective_config(objs, workload: dict[str, Any], ctr_name: str, tmp_path: Path) -> LiverecConfig:
    """Load the config the container would load: its --config file from the mounted ConfigMap, its
    literal env, its envFrom ConfigMaps, and a placeholder for every value read from a Secret."""
    pod = workload["spec"]["template"]["spec"]
    ctr = container(workload, ctr_name)
    args = ctr["args"]
    config_path = args[args.index("--config") + 1]
    mount = next(m for m in ctr["volumeMounts"] if config_path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    data = one(objs, "ConfigMap", volume["configMap"]["name"])["data"]
    rel = posixpath.relpath(config_path, mount["mountPath"])
    path = tmp_path / f"{workload['metadata']['name']}-{Path(rel).name}"
    path.write_text(data[rel])
    env: dict[str, str] = {}
    for source in ctr.get("envFrom", []):
        env.update(one(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in ctr.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = f"<secret {ref['name']}/{ref['key']}>"
    return load_config(path, env)


def mount_of(workload: dict[str, Any], ctr_name: str, path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(volumeMount, volume or None for a volumeClaimTemplate) of the deepest mount holding `path`."""
    ctr = container(workload, ctr_name)
    mounts = [m for m in ctr["volumeMounts"] if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no volume of {workload['metadata']['name']}/{ctr_name}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    return mount, volumes.get(mount["name"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_trainer_config_loads_and_matches_the_pod(name: str, tmp_path: Path) -> None:
    objs = overlay(name)
    sts = trainer(objs)
    ctr = container(sts, "trainer")
    cfg = effective_config(objs, sts, "trainer", tmp_path)
    assert cfg.trainer.metrics_host == "0.0.0.0"  # reachable by Prometheus
    assert cfg.trainer.metrics_port == port(ctr, "metrics")
    # State (RocksDB + checkpoints) on the PersistentVolumeClaim template, never on the image.
    mount, volume = mount_of(sts, "trainer", cfg.trainer.state_dir)
    assert volume is None and mount["name"] in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert not mount.get("readOnly")
    assert cfg.trainer.group_id == "liverec-trainer"


@pytest.mark.parametrize("name", OVERLAYS)
def test_serving_config_loads_and_matches_the_pod(name: str, tmp_path: Path) -> None:
    objs = overlay(name)
    dep = serving(objs)
    ctr = container(dep, "serving")
    cfg = effective_config(objs, dep, "serving", tmp_path)
    assert cfg.serving.host == "0.0.0.0" and cfg.serving.metrics_host == "0.0.0.0"
    assert cfg.serving.port == port(ctr, "grpc")
    assert cfg.serving.metrics_port == port(ctr, "metrics")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert ctr[probe]["grpc"]["port"] == cfg.serving.port
    mount, volume = mount_of(dep, "serving", cfg.serving.state_dir)
    assert volume is not None and "emptyDir" in volume and not mount.get("readOnly")
    assert cfg.serving.device == {"dev": "cpu", "prod": "cuda"}[name]
    assert cfg.serving.drain_s < dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("kind,workload_name,ctr_name", [("StatefulSet", "liverec-trainer", "trainer"),
                                                         ("Deployment", "liverec-serving", "serving")])
def test_kafka_connection_matches_the_strimzi_cluster(name, kind, workload_name, ctr_name, tmp_path) -> None:
    objs = overlay(name)
    workload = one(objs, kind, workload_name)
    cfg = effective_config(objs, workload, ctr_name, tmp_path).kafka
    kafka = one(objs, "Kafka", KAFKA)
    host, bootstrap_port = cfg.bootstrap_servers.split(":")
    assert host == f"{KAFKA}-kafka-bootstrap"
    listener = next(li for li in kafka["spec"]["kafka"]["listeners"] if li["port"] == int(bootstrap_port))
    assert listener["tls"] is True and cfg.security_protocol == "SASL_SSL"
    assert listener["authentication"]["type"] == "scram-sha-512" and cfg.sasl_mechanism == "SCRAM-SHA-512"
    # The SASL user is a KafkaUser of this cluster; its password comes from the Secret the User
    # Operator writes (named after the user), never from the ConfigMap.
    user = one(objs, "KafkaUser", cfg.sasl_username)
    assert user["metadata"]["labels"]["strimzi.io/cluster"] == KAFKA
    assert user["spec"]["authentication"]["type"] == "scram-sha-512"
    assert cfg.sasl_password == f"<secret {cfg.sasl_username}/password>"
    # The CA file is the ca.crt of Strimzi's cluster CA Secret, mounted read-only.
    mount, volume = mount_of(workload, ctr_name, cfg.ssl_cafile)
    assert mount.get("readOnly") and volume["secret"]["secretName"] == f"{KAFKA}-cluster-ca-cert"
    item = posixpath.relpath(cfg.ssl_cafile, mount["mountPath"])
    assert {"key": "ca.crt", "path": item} in volume["secret"]["items"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_kafka_topics_are_the_ones_liverec_needs(name: str, tmp_path: Path) -> None:
    objs = overlay(name)
    cfg = effective_config(objs, trainer(objs), "trainer", tmp_path)
    topics = find(objs, "KafkaTopic")
    got = {t["spec"]["topicName"]: (t["spec"]["partitions"], t["spec"]["replicas"],
                                    t["spec"].get("config", {}).get("cleanup.policy", "delete")) for t in topics}
    want = {s.name: (s.partitions, s.replication_factor, s.configs.get("cleanup.policy", "delete"))
            for s in topic_specs(cfg.topics)}
    assert got == want
    assert all(t["metadata"]["labels"]["strimzi.io/cluster"] == KAFKA for t in topics)
    assert cfg.topics.partitions == {"dev": 4, "prod": 12}[name]


@pytest.mark.parametrize("name", OVERLAYS)
def test_kafka_is_kraft_with_node_pools_sized_for_the_overlay(name: str) -> None:
    objs = overlay(name)
    kafka = one(objs, "Kafka", KAFKA)
    assert "zookeeper" not in kafka["spec"]
    pools = [p for p in find(objs, "KafkaNodePool") if p["metadata"]["labels"]["strimzi.io/cluster"] == KAFKA]
    controllers = sum(p["spec"]["replicas"] for p in pools if "controller" in p["spec"]["roles"])
    brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
    config = kafka["spec"]["kafka"]["config"]
    replicas = {t["spec"]["replicas"] for t in find(objs, "KafkaTopic")}
    if name == "dev":
        assert (controllers, brokers) == (1, 1)
        assert replicas == {1} and config["min.insync.replicas"] == 1
    else:
        assert controllers == 3 and brokers == 3  # a KRaft quorum survives one controller loss
        assert all(v["type"] == "persistent-claim" and not v["deleteClaim"]
                   for p in pools for v in p["spec"]["storage"]["volumes"])
        assert replicas == {3} and config["min.insync.replicas"] == 2
        assert config["default.replication.factor"] == 3 and config["offsets.topic.replication.factor"] == 3
    assert max(replicas) <= brokers


def acl_ops(user: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for acl in user["spec"]["authorization"]["acls"]:
        assert acl.get("type", "allow") == "allow"
        key = (acl["resource"]["type"], acl["resource"]["name"])
        out.setdefault(key, set()).update(acl["operations"])
    return out


def test_kafka_acls_grant_exactly_the_data_flow(tmp_path: Path) -> None:
    objs = overlay("prod")
    t = load_config(None).topics  # names are the same in every overlay (checked above)
    trainer_acls = acl_ops(one(objs, "KafkaUser", "liverec-trainer"))
    assert trainer_acls == {("topic", t.events): {"Describe", "Read"},
                            ("topic", t.dlq): {"Describe", "Write"},
                            ("topic", t.user_state): {"Describe", "Write"},
                            ("topic", t.params): {"Describe", "Write"},
                            ("group", "liverec-trainer"): {"Describe", "Read"}}
    serving_acls = acl_ops(one(objs, "KafkaUser", "liverec-serving"))
    assert serving_acls == {("topic", t.user_state): {"Describe", "Read"}, ("topic", t.params): {"Describe", "Read"}}
    for acls in (trainer_acls, serving_acls):
        assert not any(ops & {"Create", "Delete", "Alter", "AlterConfigs", "All"} for ops in acls.values())


# -- security ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_pod_is_non_root_read_only_and_drops_all_capabilities(name: str) -> None:
    objs = overlay(name)
    templates = list(pod_templates(objs))
    assert {w["metadata"]["name"] for w, _ in templates} == {"liverec-trainer", "liverec-serving"}
    for workload, template in templates:
        where = workload["metadata"]["name"]
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] > 0, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["automountServiceAccountToken"] is False, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        sa = one(objs, "ServiceAccount", pod["serviceAccountName"])
        assert sa["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for ctr in pod.get("initContainers", []) + pod["containers"]:
            sc = ctr["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, ctr["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, ctr["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), (where, ctr["name"])
            assert not sc.get("privileged"), (where, ctr["name"])
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(ctr["resources"][kind]), (where, ctr["name"], kind)
            # A read-only root: every writable path is a volume; /tmp included (torch, numba).
            writable = [m for m in ctr["volumeMounts"] if not m.get("readOnly")]
            assert "/tmp" in {m["mountPath"] for m in writable}, (where, ctr["name"])
            for m in writable:
                volume = volumes.get(m["name"])
                assert m["name"] in claims or (volume and ("emptyDir" in volume or "persistentVolumeClaim" in volume)), \
                    (where, m)
            # Secrets only through secretKeyRef / secret volumes, never as literal values.
            for var in ctr.get("env", []):
                assert "PASSWORD" not in var["name"] or "valueFrom" in var, (where, var["name"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_referenced_configmaps_and_secrets_exist_or_come_from_the_operators(name: str) -> None:
    objs = overlay(name)
    configmaps = {o["metadata"]["name"] for o in find(objs, "ConfigMap")}
    secrets = OPERATOR_SECRETS | {u["metadata"]["name"] for u in find(objs, "KafkaUser")}
    for workload, template in pod_templates(objs):
        pod = template["spec"]
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets
        for ctr in pod["containers"]:
            for src in ctr.get("envFrom", []):
                assert src["configMapRef"]["name"] in configmaps
            for var in ctr.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets and ref["key"] == "password"


@pytest.mark.parametrize("name", OVERLAYS)
def test_images_are_pinned_builds_of_the_repository_dockerfile(name: str) -> None:
    for workload, template in pod_templates(overlay(name)):
        for ctr in template["spec"]["containers"]:
            image = ctr["image"]
            repo, _, tag = image.rpartition(":")
            assert "/" in repo and tag and tag != "latest", image  # not a placeholder, not :latest
    images = {c["name"]: c["image"] for w, t in pod_templates(overlay(name)) for c in t["spec"]["containers"]}
    assert images["serving"].endswith("-cuda" if name == "prod" else "-cpu")
    assert images["trainer"].endswith("-cpu")


# -- workloads --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_trainer_is_one_stateful_worker_with_time_to_checkpoint(name: str) -> None:
    objs = overlay(name)
    sts = trainer(objs)
    # One worker assigns itself every partition and owns the offsets: never two trainers.
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["podManagementPolicy"] == "OrderedReady"
    pod = sts["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 120  # the final checkpoint on SIGTERM
    assert len(pod["containers"]) == 1
    ctr = container(sts, "trainer")
    assert ctr["args"][-2:] == ["train", "--quiet"]
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    headless = one(objs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    for probe in ("startupProbe", "livenessProbe"):
        assert ctr[probe]["httpGet"]["port"] == "metrics"


@pytest.mark.parametrize("name", OVERLAYS)
def test_serving_probes_are_native_grpc_health_checks(name: str) -> None:
    ctr = container(serving(overlay(name)), "serving")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(ctr[probe]) & {"httpGet", "tcpSocket", "exec"} == set(), probe
        assert ctr[probe]["grpc"]["port"] == port(ctr, "grpc"), probe
    # Readiness asks the overall health (catching up -> NOT_SERVING -> out of the Service);
    # liveness asks a separate service name, so a lagging replica is never restarted for lagging.
    assert ctr["readinessProbe"]["grpc"].get("service", "") == ""
    assert ctr["livenessProbe"]["grpc"]["service"] == "liveness"
    assert ctr["startupProbe"]["grpc"]["service"] == "liveness"


def test_dev_runs_one_small_cpu_serving_replica() -> None:
    objs = overlay("dev")
    dep = serving(objs)
    assert dep["spec"]["replicas"] == 1
    assert find(objs, "HorizontalPodAutoscaler") == []
    ctr = container(dep, "serving")
    assert not any(k.startswith("nvidia.com/") for k in ctr["resources"]["limits"])
    assert ctr["resources"]["limits"]["memory"] in ("1Gi", "2Gi")


def test_prod_runs_gpu_serving_replicas_spread_over_nodes() -> None:
    objs = overlay("prod")
    dep = serving(objs)
    assert "replicas" not in dep["spec"]  # owned by the HPA
    ctr = container(dep, "serving")
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert ctr["resources"]["requests"]["nvidia.com/gpu"] == ctr["resources"]["limits"]["nvidia.com/gpu"]
    pod = dep["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    hpa = one(objs, "HorizontalPodAutoscaler", "liverec-serving")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "liverec-serving"}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # Trainer stays on CPU (the trainer has no device setting; it runs where its image runs).
    assert not any(k.startswith("nvidia.com/") for k in container(trainer(objs), "trainer")["resources"]["limits"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_serving_is_spread_and_protected_from_voluntary_disruption(name: str) -> None:
    objs = overlay(name)
    dep = serving(objs)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    anti = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    terms = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
               and selector_matches(t["podAffinityTerm"]["labelSelector"], labels) for t in terms)
    pdb = one(objs, "PodDisruptionBudget", "liverec-serving")
    assert selector_matches(pdb["spec"]["selector"], labels) and pdb["spec"]["maxUnavailable"] == 1
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# -- selectors select -------------------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_and_monitors_select_real_pods_and_ports(name: str) -> None:
    objs = overlay(name)
    pods = {w["metadata"]["name"]: t for w, t in pod_templates(objs)}

    def ports_of(template):
        return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}

    for svc in find(objs, "Service"):
        selected = [t for t in pods.values() if selector_matches({"matchLabels": svc["spec"]["selector"]},
                                                                 t["metadata"]["labels"])]
        assert len(selected) == 1, svc["metadata"]["name"]
        for p in svc["spec"]["ports"]:
            assert ports_of(selected[0])[p["targetPort"]] == p["port"], (svc["metadata"]["name"], p)
    for w in find(objs, "Deployment") + find(objs, "StatefulSet"):
        assert selector_matches(w["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
    pm = one(objs, "PodMonitor", "liverec-trainer")
    [trainer_pod] = [t for t in pods.values() if selector_matches(pm["spec"]["selector"], t["metadata"]["labels"])]
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= set(ports_of(trainer_pod))
    sm = one(objs, "ServiceMonitor", "liverec-serving")
    [svc] = [s for s in find(objs, "Service") if selector_matches(sm["spec"]["selector"], s["metadata"]["labels"])]
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    assert svc["spec"]["clusterIP"] == "None"  # every replica's own endpoint is scraped


# -- network policies -------------------------------------------------------------------------

KAFKA_BROKER = {"ns": NAMESPACE, "labels": {"strimzi.io/cluster": KAFKA, "strimzi.io/kind": "Kafka",
                                            "strimzi.io/broker-role": "true", "strimzi.io/name": f"{KAFKA}-kafka"}}
DNS = {"ns": "kube-system", "labels": {"k8s-app": "kube-dns"}}
PROMETHEUS = {"ns": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}}
CLIENT = {"ns": "shop", "labels": {"liverec.io/recommend-client": "true"}}
STRANGER = {"ns": "shop", "labels": {"app": "other"}}
NEIGHBOUR = {"ns": NAMESPACE, "labels": {"app": "other"}}


def _peer_matches(peer: dict[str, Any], other: dict[str, Any], policy_ns: str) -> bool:
    if "ipBlock" in peer:
        return False
    ns_labels = {"kubernetes.io/metadata.name": other["ns"]}
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], ns_labels):
            return False
    elif other["ns"] != policy_ns:
        return False
    return selector_matches(peer.get("podSelector", {}), other["labels"])


def allowed(objs, pod: dict[str, Any], other: dict[str, Any], port_: int, direction: str, protocol="TCP") -> bool:
    """Whether NetworkPolicy semantics allow traffic between `pod` and `other` on `port_`."""
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [p for p in find(objs, "NetworkPolicy") if p["metadata"]["namespace"] == pod["ns"]
                 and direction in p["spec"]["policyTypes"] and selector_matches(p["spec"]["podSelector"], pod["labels"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(key, []):
            peers = rule.get(peers_key)
            peers_ok = not peers or any(_peer_matches(peer, other, policy["metadata"]["namespace"]) for peer in peers)
            ports_ok = not rule.get("ports") or any(p["port"] == port_ and p.get("protocol", "TCP") == protocol
                                                    for p in rule["ports"])
            if peers_ok and ports_ok:
                return True
    return False


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policies_allow_exactly_the_data_flow(name: str, tmp_path: Path) -> None:
    objs = overlay(name)
    t_pod = {"ns": NAMESPACE, "labels": trainer(objs)["spec"]["template"]["metadata"]["labels"]}
    s_pod = {"ns": NAMESPACE, "labels": serving(objs)["spec"]["template"]["metadata"]["labels"]}
    cfg = effective_config(objs, trainer(objs), "trainer", tmp_path)
    kafka_port = int(cfg.kafka.bootstrap_servers.rsplit(":", 1)[1])
    t_metrics = cfg.trainer.metrics_port
    s_grpc, s_metrics = cfg.serving.port, cfg.serving.metrics_port
    for pod in (t_pod, s_pod):
        assert allowed(objs, pod, KAFKA_BROKER, kafka_port, "Egress")
        assert not allowed(objs, pod, KAFKA_BROKER, 9092, "Egress")  # only the authenticated listener
        assert allowed(objs, pod, DNS, 53, "Egress", "UDP") and allowed(objs, pod, DNS, 53, "Egress", "TCP")
        assert not allowed(objs, pod, NEIGHBOUR, 443, "Egress")
        assert not allowed(objs, pod, STRANGER, 443, "Egress")
        assert not allowed(objs, pod, NEIGHBOUR, s_grpc, "Ingress")
    assert allowed(objs, t_pod, PROMETHEUS, t_metrics, "Ingress")
    assert not allowed(objs, t_pod, CLIENT, t_metrics, "Ingress")
    assert allowed(objs, s_pod, PROMETHEUS, s_metrics, "Ingress")
    assert allowed(objs, s_pod, CLIENT, s_grpc, "Ingress")
    assert not allowed(objs, s_pod, STRANGER, s_grpc, "Ingress")
    assert not allowed(objs, s_pod, CLIENT, s_metrics, "Ingress")
    assert not allowed(objs, s_pod, t_pod, s_grpc, "Egress") and not allowed(objs, t_pod, s_pod, s_grpc, "Egress")
    # A default deny covers every liverec pod, present and future.
    deny = one(objs, "NetworkPolicy", "liverec-default-deny")
    assert deny["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "liverec"}}
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in deny["spec"]
    # Kafka's side: Strimzi's generated policy admits only liverec's two workloads on the listener.
    listener = next(li for li in one(objs, "Kafka", KAFKA)["spec"]["kafka"]["listeners"] if li["port"] == kafka_port)
    peers = listener["networkPolicyPeers"]
    assert any(_peer_matches(p, t_pod, NAMESPACE) for p in peers)
    assert any(_peer_matches(p, s_pod, NAMESPACE) for p in peers)
    assert not any(_peer_matches(p, NEIGHBOUR, NAMESPACE) for p in peers)


def test_network_policy_evaluator_denies_without_a_matching_rule() -> None:
    objs = overlay("dev")
    pod = {"ns": NAMESPACE, "labels": {"app.kubernetes.io/name": "liverec", "app.kubernetes.io/component": "new"}}
    # A new liverec component gets nothing but DNS until a policy allows it.
    assert not allowed(objs, pod, KAFKA_BROKER, 9093, "Egress")
    assert not allowed(objs, pod, PROMETHEUS, 9400, "Ingress")
    assert allowed(objs, pod, DNS, 53, "Egress", "UDP")
    # Pods outside liverec's labels are not selected by liverec's policies at all.
    assert allowed(objs, NEIGHBOUR, STRANGER, 80, "Ingress")
