"""`liverec broker` runs the real Tansu broker on loopback and stops cleanly on a signal."""

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from liverec.platform.broker import answers_metadata, free_port, free_ports


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_broker_command_starts_answers_and_stops(sig: signal.Signals) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "liverec.platform", "broker", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line == f"bootstrap_servers=127.0.0.1:{port}"
        assert answers_metadata(f"127.0.0.1:{port}")
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
        assert "broker stopped" in proc.stdout.read()
        assert not listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_broker_binds_loopback_only(broker) -> None:
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if f":{broker.port} " in line]
    assert lines, out
    assert all("127.0.0.1:" in line for line in lines), lines


def test_broker_dies_with_its_parent() -> None:
    """A kill -9 of the process that started the broker must not leave it listening."""
    port = free_port()
    code = ("from liverec.platform.broker import LocalBroker; import time; "
            f"b = LocalBroker(port={port}).start(); print('up', flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "up"
        assert listening(port)
        parent.kill()
        parent.wait()
        for _ in range(100):
            if not listening(port):
                break
            subprocess.run(["sleep", "0.1"])
        assert not listening(port)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_free_ports_lie_below_the_ephemeral_range_and_are_free() -> None:
    """Client connections take their local ports from the ephemeral range, so a port handed out
    for a server started later must come from below it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for ports in ([free_port()], free_ports(3)):
        assert 10_000 <= ports[0] and ports[-1] < low
        for port in ports:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))  # raises if it were taken
    ports = free_ports(3)  # for servers started together: never one port twice
    assert len(set(ports)) == 3 and all(10_000 <= port < low for port in ports)
