"""Helpers for tests/k8s: render the kustomize overlays, validate objects offline, read PromQL.

Everything here runs offline: `kubectl kustomize` (kustomize v5), the Kubernetes OpenAPI schemas
shipped in the PyPI package kubernetes-validate, the CRD schemas under k8s/schemas/, and promtool.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = K8S / "schemas"
OVERLAYS = ("dev", "prod")
RULES_FILE = K8S / "base" / "monitoring" / "prometheusrule.yaml"
RULES_TESTS = K8S / "base" / "monitoring" / "rules.test.yaml"
DASHBOARD = K8S / "base" / "monitoring" / "dashboards" / "liverec.json"
# The Kubernetes version every rendered built-in object is validated against.
KUBERNETES_VERSION = "1.30"


def tool(name: str) -> str:
    """The path of a required command-line tool; a clear failure (never a skip) when it is missing."""
    path = shutil.which(name)
    assert path, f"{name} not found: run `bash .ci/system-deps-k8s` (installs prometheus/promtool and kubectl)"
    return path


# -- rendering ---------------------------------------------------------------------------------


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize k8s/<target>` renders (target: base, overlays/dev, ...)."""
    out = subprocess.run([tool("kubectl"), "kustomize", str(K8S / target)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"kubectl kustomize k8s/{target} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def overlay(name: str) -> tuple[dict[str, Any], ...]:
    return render(f"overlays/{name}")


def find(objs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def configmap(objs: tuple[dict[str, Any], ...], prefix: str) -> dict[str, Any]:
    """The ConfigMap generated from `prefix` (kustomize appends a content hash to the name)."""
    found = [o for o in find(objs, "ConfigMap") if re.fullmatch(rf"{re.escape(prefix)}(-[a-z0-9]{{10}})?",
                                                                o["metadata"]["name"])]
    assert len(found) == 1, f"expected one ConfigMap generated from {prefix}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_templates(objs: tuple[dict[str, Any], ...]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) of every Deployment, StatefulSet, DaemonSet, Job and CronJob."""
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield o, o["spec"]["template"]
        elif o["kind"] == "CronJob":
            yield o, o["spec"]["jobTemplate"]["spec"]["template"]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']} has no single container {name!r}"
    return found[0]


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a label set."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# -- validation --------------------------------------------------------------------------------


class ValidationFailure(AssertionError):
    pass


def crd_schema_path(obj: dict[str, Any]) -> Path | None:
    """k8s/schemas/<group>/<kind>_<version>.json for a custom resource, None for other objects."""
    api_version = obj["apiVersion"]
    if "/" not in api_version:
        return None
    group, version = api_version.split("/", 1)
    path = SCHEMAS / group / f"{obj['kind'].lower()}_{version}.json"
    return path if path.is_file() else None


@functools.cache
def _crd_validator(path: Path) -> jsonschema.protocols.Validator:
    schema = json.loads(path.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(obj: dict[str, Any]) -> str:
    """Validate one object offline; returns what it was validated against, raises ValidationFailure.

    Custom resources go against k8s/schemas/, everything else against the Kubernetes OpenAPI
    schema of KUBERNETES_VERSION in strict mode (unknown fields are errors). An object of a kind
    neither knows fails: nothing passes unvalidated.
    """
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    path = crd_schema_path(obj)
    if path is not None:
        errors = sorted(_crd_validator(path).iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            raise ValidationFailure(f"{where}: " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors))
        return str(path.relative_to(REPO))
    try:
        version = kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise ValidationFailure(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}") from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise ValidationFailure(f"{where}: no schema: {exc.message}") from None
    return f"kubernetes {version}"


# -- rules and PromQL --------------------------------------------------------------------------


def rules_spec() -> dict[str, Any]:
    """The PrometheusRule's spec: a plain Prometheus rule file."""
    return yaml.safe_load(RULES_FILE.read_text())["spec"]


def write_rules(directory: Path, spec: dict[str, Any] | None = None) -> Path:
    """Write the rule file and the promtool unit tests side by side; returns the tests' path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "liverec.rules.yaml").write_text(yaml.safe_dump(spec or rules_spec(), sort_keys=False))
    tests = directory / "rules.test.yaml"
    tests.write_text(RULES_TESTS.read_text())
    return tests


def rules(spec: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [r for g in (spec or rules_spec())["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


# Grafana variables, replaced by concrete values before PromQL is parsed.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "${datasource}": "x",
                     "$namespace": ".*"}


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard (panel targets and query variables), variables filled in."""
    exprs = [t["expr"] for p in dashboard_panels(dash) for t in p.get("targets", []) if t.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
            assert match, f"unsupported variable query {query!r}"
            exprs.append(match.group(1))
    out = []
    for expr in exprs:
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
        out.append(expr)
    return out


_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MODIFIER = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKEN = re.compile(r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and literals dropped)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers (strings already emptied)
    text = _MODIFIER.sub(" ", text)  # by (...), on (...), group_left (...)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\boffset\s+\S+", " ", text)
    names = set()
    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if token[0].isdigit() or token.lower() in _KEYWORDS:
            continue
        if re.match(r"\s*\(", text[match.end():]):  # a function or an aggregation
            continue
        names.add(token)
    return names


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=120)
