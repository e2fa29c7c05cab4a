"""What `liverec demo` shows while it runs: figures scraped from the processes' /metrics, one view.

The trainer and the serving replica are separate processes; everything the view shows about
them is read from their Prometheus endpoints over HTTP (the same text a Prometheus server would
scrape), never from shared memory. The demo adds what only it knows: how many events it has
produced, its own Recommend calls (client-side latency, the answers), the freshness probes and
the popularity baseline over the stream it replays.

On a terminal the view is a block of lines redrawn in place a few times a second; when stdout is
not a terminal (a log, CI) it prints one self-contained line per second instead.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]


class MetricsUnavailable(RuntimeError):
    """An endpoint did not answer (not up yet, or gone)."""


@dataclass(frozen=True)
class Scrape:
    """One scrape of a /metrics endpoint: sample name and labels -> value."""

    at: float  # time.monotonic() of the scrape
    samples: dict[tuple[str, Labels], float]

    def value(self, name: str, default: float = math.nan, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (default if none)."""
        want = set(labels.items())
        found = [v for (n, ls), v in self.samples.items() if n == name and want <= ls]
        return math.fsum(found) if found else default

    def series(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        want = set(labels.items())
        return [(dict(ls), v) for (n, ls), v in self.samples.items() if n == name and want <= ls]

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """Cumulative histogram buckets `(le, count)` of `name` (summed over other labels), sorted by le."""
        out: dict[float, float] = {}
        for ls, v in self.series(f"{name}_bucket", **labels):
            le = float(ls["le"])
            out[le] = out.get(le, 0.0) + v
        return sorted(out.items())


def scrape(port: int, host: str = "127.0.0.1", timeout_s: float = 2.0) -> Scrape:
    """GET http://host:port/metrics and parse the Prometheus text format."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError as exc:
        raise MetricsUnavailable(f"{host}:{port}: {exc}") from exc
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return Scrape(time.monotonic(), samples)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding quantile q."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le  # beyond the last finite bucket: its bound is all we know
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return buckets[-1][0]


def bucket_delta(new: list[tuple[float, float]], old: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Buckets of the observations made between two scrapes."""
    before = dict(old)
    return [(le, count - before.get(le, 0.0)) for le, count in new]


def percentile(values: Iterable[float], q: float) -> float:
    data = sorted(values)
    if not data:
        return math.nan
    pos = q * (len(data) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


# -- what the view shows ---------------------------------------------------------------------------


@dataclass
class AnswerLine:
    """A Recommend answer worth showing: whose, what, and how fresh."""

    user_id: int
    items: list[int]
    state_version: int
    model_version: int
    staleness_ms: int
    cold_start: bool
    latency_ms: float
    latest_offset: int | None  # the newest offset the demo produced for this user, when known


@dataclass
class ViewState:
    """Everything one frame of the view needs (filled by the demo, rendered here)."""

    elapsed_s: float = 0.0
    phase: str = "starting"
    produced: int = 0
    to_produce: int = 0
    rate: float | None = None
    applied: float = math.nan
    events_per_s: float = math.nan
    loss: float = math.nan
    hr10: float = math.nan  # the trainer's rolling prequential HR@10
    pop_hr10: float = math.nan  # popularity's, over the same recent window of the stream
    lag: float = math.nan
    refreshes: float = math.nan
    dead_lettered: float = 0.0
    model_version: float = math.nan
    serving_version: float = math.nan
    serving_ready: float = math.nan
    server_p99_ms: float = math.nan
    client_p99_ms: float = math.nan
    recommends_ok: int = 0
    recommends_failed: int = 0
    probes_done: int = 0
    probes_total: int = 0
    freshness_p50_s: float = math.nan
    last_freshness_s: float = math.nan
    answers: list[AnswerLine] = field(default_factory=list)


def _num(x: float, fmt: str = ",.0f", missing: str = "–") -> str:
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _answer_text(a: AnswerLine) -> str:
    if a.cold_start:
        return f"user {a.user_id} → {', '.join(map(str, a.items[:5]))} · cold start (no state yet: popular items)"
    if a.latest_offset is None:
        fresh = ""
    elif a.state_version >= a.latest_offset:
        fresh = " (has their latest event)"
    else:
        fresh = f" (their latest event, offset {a.latest_offset}, not in it yet)"
    return (f"user {a.user_id} → {', '.join(map(str, a.items[:5]))} · state v{a.state_version}{fresh} · "
            f"{a.staleness_ms / 1000:,.1f} s stale · model v{a.model_version} · {a.latency_ms:.1f} ms")


def frame_lines(v: ViewState, width: int = 120) -> list[str]:
    """The view as lines (the terminal form)."""
    mins, secs = divmod(int(v.elapsed_s), 60)
    total = f"/{v.to_produce:,}" if v.to_produce else ""
    pct = f" ({100 * v.produced / v.to_produce:.0f}%)" if v.to_produce else ""
    rate = f", paced at {v.rate:g} ev/s" if v.rate else ""
    ready = {1.0: "ready", 0.0: "not ready"}.get(v.serving_ready, "–")
    lines = [
        f"liverec demo · {v.phase} · {mins}:{secs:02d} · produced {v.produced:,}{total} events{pct}{rate}",
        f"  trainer    applied {_num(v.applied)} · {_num(v.events_per_s)} ev/s · lag {_num(v.lag)} · "
        f"loss {_num(v.loss, '.3f')} · state refreshes {_num(v.refreshes)} · DLQ {_num(v.dead_lettered)}",
        f"  quality    online HR@10 {_num(v.hr10, '.3f')} vs popularity {_num(v.pop_hr10, '.3f')} "
        f"(prequential, last 5k events scored)",
        f"  serving    model v{_num(v.serving_version)} (trainer at v{_num(v.model_version)}) · {ready} · "
        f"Recommend p99 {_num(v.server_p99_ms, '.1f')} ms server, {_num(v.client_p99_ms, '.1f')} ms client · "
        f"{v.recommends_ok:,} calls ok, {v.recommends_failed:,} failed",
        f"  freshness  {v.probes_done}/{v.probes_total} probes: event → Recommend p50 "
        f"{_num(v.freshness_p50_s, '.2f')} s, last {_num(v.last_freshness_s, '.2f')} s",
    ]
    for i, a in enumerate(v.answers[-3:]):
        lines.append(("  answers    " if i == 0 else "             ") + _answer_text(a))
    return [line if len(line) <= width else line[: width - 1] + "…" for line in lines]


def plain_line(v: ViewState) -> str:
    """The view as one line (the form for logs and pipes)."""
    last = v.answers[-1] if v.answers else None
    answer = ""
    if last is not None and not last.cold_start:
        answer = f" | user {last.user_id} top {last.items[:3]} v{last.state_version} {last.staleness_ms:,} ms stale"
    return (f"[{v.elapsed_s:6.1f}s] {v.phase}: produced {v.produced:,} applied {_num(v.applied)} "
            f"({_num(v.events_per_s)} ev/s) loss {_num(v.loss, '.3f')} HR@10 {_num(v.hr10, '.3f')} "
            f"pop {_num(v.pop_hr10, '.3f')} lag {_num(v.lag)} refreshes {_num(v.refreshes)} "
            f"p99 {_num(v.server_p99_ms, '.1f')} ms recs {v.recommends_ok:,} "
            f"fresh p50 {_num(v.freshness_p50_s, '.2f')} s{answer}")


class LiveView:
    """Redraws the frame in place on a terminal; one line per `plain_every_s` otherwise."""

    def __init__(self, out: TextIO = sys.stdout, mode: str = "auto", plain_every_s: float = 1.0) -> None:
        self.out = out
        self.tty = out.isatty() if mode == "auto" else mode == "tty"
        self.quiet = mode == "off"
        self.plain_every_s = plain_every_s
        self._drawn = 0
        self._last_plain = -math.inf

    def update(self, state: ViewState, force: bool = False) -> None:
        if self.quiet:
            return
        if self.tty:
            width = max(60, shutil.get_terminal_size((120, 24)).columns)
            lines = frame_lines(state, width)
            buf = []
            if self._drawn:
                buf.append(f"\x1b[{self._drawn}F")  # to the first line of the previous frame
            for line in lines:
                buf.append("\x1b[2K" + line + "\n")
            for _ in range(self._drawn - len(lines)):  # the previous frame was taller
                buf.append("\x1b[2K\n")
            extra = max(0, self._drawn - len(lines))
            if extra:
                buf.append(f"\x1b[{extra}F")
            self.out.write("".join(buf))
            self.out.flush()
            self._drawn = len(lines)
        else:
            now = time.monotonic()
            if force or now - self._last_plain >= self.plain_every_s:
                self._last_plain = now
                self.out.write(plain_line(state) + "\n")
                self.out.flush()

    def message(self, text: str) -> None:
        """A line printed above the view (the view is redrawn below it next time)."""
        if self.tty and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
        self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        self._drawn = 0
