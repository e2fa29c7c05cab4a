"""`liverec demo`, reduced: the whole platform end to end, a report with sane figures, nothing left behind.

The reduced run replays a small synthetic world (600 users, 500 items, 6,000 events) to a model
of one layer over the last 10 events (dim 64: narrower models learn this stream too slowly to
beat popularity within a few thousand events). The demo starts its own broker, trainer and
serving replica, so these tests need no session broker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = [sys.executable, "-m", "liverec.platform", "demo"]
EVENTS, PROBES = 10_000, 5
SMALL_MODEL = {"LIVEREC_MODEL__ENCODER__DIM": "64", "LIVEREC_MODEL__ENCODER__LAYERS": "1",
               "LIVEREC_MODEL__ENCODER__HEADS": "1", "LIVEREC_MODEL__ENCODER__MAX_LEN": "10"}


def demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEREC_")}
    return {**env, **SMALL_MODEL, "PYTHONUNBUFFERED": "1"}


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_nothing_left(processes: dict[str, dict]) -> None:
    assert set(processes) == {"broker", "trainer", "serving"}
    for name, info in processes.items():
        assert not alive(info["pid"]), f"{name} (pid {info['pid']}) is still running"
        for kind, port in info["ports"].items():
            assert not listening(port), f"{name}'s {kind} port {port} is still listening"


@pytest.mark.slow
def test_reduced_demo_learns_serves_reports_and_leaves_nothing_behind(tmp_path: Path) -> None:
    report = tmp_path / "report"
    out = subprocess.run(DEMO + ["--events", str(EVENTS), "--users", "600", "--items", "500", "--rate", "300",
                                 "--probes", str(PROBES), "--recommend-rate", "10", "--view", "plain",
                                 "--report-dir", str(report)],
                         env=demo_env(), capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]

    # the live view (plain: one line per second, read from the processes' /metrics) and the summary
    assert "streaming: produced" in out.stdout
    assert "liverec demo — summary" in out.stdout and "events applied by the trainer" in out.stdout
    assert f"report: {report / 'report.md'}" in out.stdout

    for name in ("hr10.png", "latency.png", "bytes_per_user.png", "freshness.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (report / "report.md").read_text()
    for name in ("hr10.png", "latency.png", "bytes_per_user.png", "freshness.png"):
        assert f"({name})" in md
    data = json.loads((report / "report.json").read_text())
    f = data["figures"]

    # every event produced (replayed + probes) was consumed and learned, none dead-lettered
    assert f["events_replayed"] == EVENTS and f["probe_events"] == PROBES
    assert f["events_applied"] == f["events_consumed"] == f["events_produced"] == EVENTS + PROBES
    assert f["dead_lettered"] == 0
    # the model learned the stream's sequential structure: online HR@10 above popularity's
    assert f["prequential_scored"] > EVENTS // 2
    assert 0 < f["popularity_hr10"] < f["online_hr10"] <= 1
    assert abs(f["popularity_hr10_demo_recomputed"] - f["popularity_hr10"]) < 0.02
    # real Recommend calls were answered and timed, on both sides
    assert f["recommend_ok"] > 0 and not f["recommend_failed"]
    client, server = f["client_latency_ms"], f["server_latency_ms"]
    assert 0 < client["p50"] <= client["p95"] <= client["p99"] <= client["max"]
    assert 0 < server["p50"] <= server["p99"]
    assert len(data["recommends"]) == f["recommend_ok"]
    assert any(not a["cold_start"] and a["state_version"] >= 0 for a in data["answers"])
    # freshness: every probe event showed up in a later Recommend's state
    assert f["freshness_s"]["probes"] == f["freshness_s"]["seen"] == PROBES
    assert all(p["freshness_s"] > 0 and p["state_version"] >= p["offset"] for p in data["probes"])
    # bytes per user by codec, measured on this run's users
    b = f["bytes_per_user"]
    assert set(b) >= {"full", "int8", "window", "pages"}
    assert 0 < b["int8"] < b["full"] and b["collective"] < b["int8"]
    assert all(c["formula_agrees"] for c in data["codec_bytes"].values())
    # the live view's time series came from the trainer's /metrics
    assert data["ticks"][-1]["applied"] == EVENTS + PROBES

    assert data["shutdown"]["left"] == []
    assert data["shutdown"]["exit_codes"] == {"trainer": 0, "serving": 0}
    assert_nothing_left(data["processes"])


@pytest.mark.slow
def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    report = tmp_path / "report"
    proc = subprocess.Popen(DEMO + ["--events", "50000", "--users", "600", "--items", "500", "--rate", "200",
                                    "--probes", "0", "--view", "plain", "--report-dir", str(report)],
                            env=demo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the stream runs: broker, trainer and replica all up
            seen.append(line)
            if "] streaming: produced" in line:
                break
        assert any("] streaming: produced" in line for line in seen), "".join(seen)[-4000:]
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(seen)[-2000:] + rest[-2000:]
    assert "interrupted" in rest
    shutdown = json.loads((report / "logs" / "shutdown.json").read_text())
    assert shutdown["left"] == []
    assert_nothing_left(shutdown["processes"])
