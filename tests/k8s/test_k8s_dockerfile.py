"""The Dockerfile cannot be built here (no Docker engine): check what can be checked statically —
stages, a pinned base, the Makefile's install order, a non-root runtime with only the venv, and a
.dockerignore that lets in exactly what the build copies."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from tests.k8s.k8s_helpers import REPO, overlay, pod_templates

DOCKERFILE = REPO / "Dockerfile"


def instructions(stage: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, optionally of one stage only."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else None
        if stage is None or current == stage or (word == "FROM" and rest.endswith(f"AS {stage}")):
            out.append((word, rest.strip()))
    return out


def test_multi_stage_with_a_pinned_base() -> None:
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS build") and froms[1].endswith("AS runtime")
    args = dict(rest.split("=", 1) for word, rest in instructions() if word == "ARG" and "=" in rest)
    base = args["PYTHON_IMAGE"]
    image, _, tag = base.partition("@")[0].rpartition(":")
    assert image == "python" and re.fullmatch(r"3\.11\.\d+-slim-bookworm", tag), base  # an exact patch release


def test_build_installs_torch_then_fbgemm_then_torchrec_without_deps() -> None:
    runs = " ".join(rest for word, rest in instructions("build") if word == "RUN")
    torch = runs.index("pip install torch==2.13.0")
    fbgemm = runs.index("pip install fbgemm-gpu-cpu==1.8.0")
    torchrec = runs.index("pip install --no-deps torchrec==1.8.0")
    assert torch < fbgemm < torchrec < runs.index("runtime-requirements.txt")
    assert "https://download.pytorch.org/whl/cpu" in runs and "TORCH_VARIANT" in runs
    assert "pip install --no-deps ." in runs and "liverec.platform.protogen" in runs


def test_runtime_excludes_only_test_tools_from_the_lock() -> None:
    runs = " ".join(rest for word, rest in instructions("build") if word == "RUN")
    pattern = re.search(r"grep -viE '([^']+)'", runs).group(1)
    lock = (REPO / "requirements" / "lock.txt").read_text().splitlines()
    dropped = {line.split("==")[0].lower() for line in lock if re.match(pattern, line, re.IGNORECASE)}
    assert {"pytest", "hypothesis", "kubernetes-validate", "jsonschema"} <= dropped
    # Nothing the running processes import is dropped.
    for runtime in ("torch", "kafka-python", "grpcio", "protobuf", "rocksdict", "prometheus_client", "numpy",
                    "numba", "pyyaml", "tensordict", "torchmetrics"):
        assert runtime not in dropped, runtime


def test_runtime_stage_is_non_root_and_carries_only_the_venv() -> None:
    runtime = instructions("runtime")
    copies = [rest for word, rest in runtime if word == "COPY"]
    assert copies == ["--from=build /opt/liverec /opt/liverec"]
    user = [rest for word, rest in runtime if word == "USER"]
    assert user == ["10001:10001"]
    assert [rest for word, rest in runtime if word == "ENTRYPOINT"] == ['["liverec"]']
    # The uid the pods run as (runAsUser) is the image's user.
    for name in ("dev", "prod"):
        for _, template in pod_templates(overlay(name)):
            assert template["spec"]["securityContext"]["runAsUser"] == 10001
            assert template["spec"]["securityContext"]["runAsGroup"] == 10001
    exposed = {int(p) for word, rest in runtime if word == "EXPOSE" for p in shlex.split(rest)}
    assert exposed == {50051, 9400, 9401}


def test_runtime_preloads_a_pinned_tcmalloc_at_the_path_it_links() -> None:
    runtime = instructions("runtime")
    runs = " ".join(rest for word, rest in runtime if word == "RUN")
    assert re.search(r"apt-get install -y --no-install-recommends libtcmalloc-minimal4=\d[\w.+~-]*", runs)
    link = re.search(r'ln -s "\$\(echo (\S+)\)" (\S+)', runs)
    assert link and link.group(1).endswith("/libtcmalloc_minimal.so.4")
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert f"LD_PRELOAD={link.group(2)}" in env.split()
    # Installed before the switch to the unprivileged user, which could not run apt.
    words = [word for word, _ in runtime]
    assert max(i for i, w in enumerate(words) if w == "RUN") < words.index("USER")


def _glob(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics: the last matching pattern wins, `!` re-includes, a pattern
    matching a directory covers everything inside it."""
    ignored = False
    candidates = [path] + [str(p) for p in Path(path).parents if str(p) != "."]
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob((pattern[1:] if negate else pattern).rstrip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_admits_exactly_what_the_build_copies() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = []
    for word, rest in instructions("build"):
        if word == "COPY":
            sources.extend(rest.split()[:-1])
    for source in sources:
        assert (REPO / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is copied but ignored"
    for inside in ("liverec/platform/config.py", "proto/liverec/v1/events.proto", "benchmarks/__init__.py"):
        assert not _ignored(inside, patterns), inside
    for kept_out in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "k8s/base/kustomization.yaml",
                     "runs/trainer/x", "liverec/v1/events_pb2.py", "benchmarks/results/store.json",
                     "liverec/__pycache__/x.pyc", "Makefile"):
        assert _ignored(kept_out, patterns), kept_out
