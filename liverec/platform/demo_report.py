"""The report `liverec demo` leaves behind: report.md, report.json and PNG plots in one directory.

Also the two figures the demo computes itself rather than scrapes:
- the popularity baseline over the replayed stream, prequential like the trainer's own (each
  event ranked by item counts *before* its micro-batch, ties against the target, an item never
  seen yet is a miss, only events with an earlier event of the same user are scored), so the
  view and the HR@10 plot can show it next to the model over any window of the stream;
- bytes per user by codec, measured by encoding a sample of this run's users' histories with
  every codec of `liverec.model.codecs` (sizes depend on history lengths and shapes only, not on
  the weights, so a freshly initialised model gives the same bytes as the trained one).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from liverec.platform.demo_view import histogram_quantile, percentile

K = 10
HR_WINDOW = 5_000  # scored events, as the trainer's rolling prequential gauge


# -- popularity, prequential, over the stream --------------------------------------------------


def popularity_prequential(user_id: np.ndarray, item_id: np.ndarray, batch: int, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Per event: (scored, hit) of the popularity baseline, in micro-batches of `batch` events.

    Mirrors `OnlineLearner._prequential`'s popularity scores: the catalog is every item seen in
    earlier batches, scored by its count; the target's rank counts every other item with a count
    >= its own (ties against the target); a target not yet in the catalog misses.
    """
    n = len(user_id)
    scored = np.zeros(n, bool)
    hits = np.zeros(n, bool)
    if n == 0:
        return scored, hits
    items, codes = np.unique(item_id, return_inverse=True)
    counts = np.zeros(len(items), np.int64)
    seen_users: set[int] = set()
    users = user_id.tolist()
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        catalog = np.sort(counts[counts > 0])
        block = codes[start:stop]
        c = counts[block]
        ge = len(catalog) - np.searchsorted(catalog, c, side="left")  # items with count >= c, target included
        hit = (c > 0) & (ge - 1 < k)
        has_prior = np.zeros(stop - start, bool)
        in_block: set[int] = set()
        for j, u in enumerate(users[start:stop]):
            has_prior[j] = u in seen_users or u in in_block  # an earlier event: stored, or earlier in the batch
            in_block.add(u)
        seen_users |= in_block
        scored[start:stop] = has_prior
        hits[start:stop] = hit & has_prior
        np.add.at(counts, block, 1)
    return scored, hits


def windowed_rate(scored: np.ndarray, hits: np.ndarray, end: int, window: int = HR_WINDOW) -> float:
    """Hit rate over the last `window` scored events among events [0, end)."""
    end = max(0, min(end, len(scored)))
    idx = np.flatnonzero(scored[:end])[-window:]
    return float(hits[idx].mean()) if len(idx) else math.nan


# -- bytes per user by codec --------------------------------------------------------------------


def measure_codec_bytes(model_config: Any, histories: list[tuple[np.ndarray, np.ndarray]], state_params: dict[str, dict],
                        seed: int = 0) -> dict[str, dict[str, Any]]:
    """Encode `histories` (item ids, actions; each the last `max_len` events of a user) with every
    codec; mean/p99/max payload and record bytes per user, and the bytes at a full window."""
    import torch

    from liverec.model.codecs.record import record_for
    from liverec.model.codecs.registry import CONFIGS, codec_from_config
    from liverec.model.recommender import SequentialRecommender

    if not histories:
        return {}
    torch.manual_seed(seed)
    model = SequentialRecommender(model_config).eval()
    dim = model_config.encoder.dim
    width = max(len(items) for items, _ in histories)
    acts = torch.zeros(len(histories), width, dtype=torch.long)
    valid = torch.zeros(len(histories), width, dtype=torch.bool)
    for row, (items, actions) in enumerate(histories):
        n = len(items)
        acts[row, width - n:] = torch.from_numpy(actions.astype(np.int64))
        valid[row, width - n:] = True
    emb = torch.randn(len(histories), width, dim)
    out: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        cache = model.encode(emb, acts, valid)
        for name in CONFIGS:
            codec = codec_from_config(name, model_config, **state_params.get(name, {}))
            if codec.module is not None:
                codec.module.eval()
            payloads = codec.encode(cache, model)
            sizes = np.array([len(p) for p in payloads], np.float64)
            records = np.array([len(record_for(codec, p, 1, 0, 0)) for p in payloads], np.float64)
            out[name] = {
                "payload_mean": float(sizes.mean()), "payload_p99": float(np.percentile(sizes, 99)),
                "record_mean": float(records.mean()), "full_window": codec.bytes_per_user(model_config.encoder.max_len),
                "learned": codec.module is not None, "users": len(payloads),
                "formula_agrees": all(len(p) == codec.bytes_per_user(len(h[0])) for p, h in zip(payloads, histories)),
            }
    return out


def read_bench_state(path: Path) -> dict[str, Any] | None:
    """`liverec bench state`'s results, if the file is there: its dataset, model and one row per
    codec variant (bytes per user, HR@10 relative to `full`); None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        rows = [{"variant": str(r["codec"]), "codec": str(r["name"]), "bytes_mean": float(r["bytes_mean"]),
                 "hr10_ratio": r.get("HR@10_ratio"), "params": r.get("params", {})} for r in data["rows"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not rows:
        return None
    return {"path": str(path), "date": data.get("date"), "dataset": Path(str(data.get("dataset", "?"))).name,
            "model": data.get("model", {}), "users": data.get("users"), "rows": rows}


def bench_bytes_by_codec(bench: dict[str, Any] | None) -> dict[str, float]:
    """The first (default-parameter) variant's bytes per user of each codec in the benchmark."""
    out: dict[str, float] = {}
    for row in (bench or {}).get("rows", []):
        out.setdefault(row["codec"], row["bytes_mean"])
    return out


# -- the record of a run --------------------------------------------------------------------------


@dataclass
class DemoRecord:
    """Everything a demo run measured; `figures()` derives the summary, `write_report` the files."""

    started_at: str
    command: str
    machine: str
    dataset: str
    dataset_note: str
    rate: float | None
    batch_events: int
    model: dict[str, Any]
    codec: str
    replayed: int = 0
    probes_sent: int = 0
    wall_s: float = 0.0
    stream_s: float = 0.0
    processes: dict[str, dict[str, Any]] = field(default_factory=dict)
    trainer_summary: dict[str, Any] = field(default_factory=dict)
    ticks: list[dict[str, float]] = field(default_factory=list)
    recommends: list[dict[str, Any]] = field(default_factory=list)
    server_latency_buckets: list[tuple[float, float]] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)
    codec_bytes: dict[str, dict[str, Any]] = field(default_factory=dict)
    bench_state: dict[str, Any] | None = None
    shutdown: dict[str, Any] = field(default_factory=dict)
    trainer_stages: dict[str, float] = field(default_factory=dict)
    load_average: dict[str, list[float]] = field(default_factory=dict)
    pop_scored: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    pop_hits: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def produced(self) -> int:
        return self.replayed + self.probes_sent

    def trainer_progress(self) -> tuple[float | None, float | None]:
        """(events/s while the trainer was learning, seconds it needed after the stream ended):
        from the first tick with an applied event to the first with all of them applied."""
        ticks = [t for t in self.ticks if t.get("applied") == t.get("applied")]  # not NaN
        if not ticks:
            return None, None
        final = ticks[-1]["applied"]
        first = next((t for t in ticks if t["applied"] > 0), None)
        done = next((t for t in ticks if t["applied"] >= final), None)
        rate = final / (done["t"] - first["t"]) if first and done and done["t"] > first["t"] else None
        stream_end = next((t for t in ticks if t.get("replay_done")), None)
        catchup = max(0.0, done["t"] - stream_end["t"]) if done and stream_end else None
        return rate, catchup

    def figures(self) -> dict[str, Any]:
        s = self.trainer_summary
        ok = [r for r in self.recommends if r["code"] == "OK"]
        lat = [r["latency_ms"] for r in ok]
        # staleness = now - time of the newest event in the served state: it includes how long ago the
        # user was last active, so only answers given while the stream ran (for users it had just
        # touched) say something about the pipeline
        warm = [r["staleness_ms"] for r in ok if not r["cold_start"] and r.get("streaming", True)]
        fresh = [p["freshness_s"] for p in self.probes if p.get("freshness_s") is not None]
        pop_demo = float(self.pop_hits.sum() / max(self.pop_scored.sum(), 1))
        applied = s.get("applied")
        return {
            "events_produced": self.produced,
            "events_replayed": self.replayed,
            "probe_events": self.probes_sent,
            "events_consumed": s.get("consumed"),
            "events_applied": applied,
            "dead_lettered": sum((s.get("dead_lettered") or {}).values()),
            "stream_seconds": round(self.stream_s, 1),
            "trainer_events_per_s": _r(self.trainer_progress()[0], 1),
            "trainer_catchup_seconds": _r(self.trainer_progress()[1], 1),
            "trainer_stage_seconds": {k: round(v, 2) for k, v in sorted(self.trainer_stages.items(),
                                                                         key=lambda kv: -kv[1])},
            "online_hr10": s.get("HR@10"),
            "online_ndcg10": s.get("NDCG@10"),
            "popularity_hr10": s.get("popularity_HR@10"),
            "popularity_ndcg10": s.get("popularity_NDCG@10"),
            "popularity_hr10_demo_recomputed": round(pop_demo, 4),
            "prequential_scored": s.get("scored"),
            "final_loss": self.ticks[-1]["loss"] if self.ticks else None,
            "state_refreshes": self.ticks[-1]["refreshes"] if self.ticks else None,
            "model_version": self.ticks[-1]["model_version"] if self.ticks else None,
            "recommend_ok": len(ok),
            "recommend_failed": {code: sum(1 for r in self.recommends if r["code"] == code)
                                 for code in sorted({r["code"] for r in self.recommends} - {"OK"})},
            "recommend_cold_start": sum(1 for r in ok if r["cold_start"]),
            "answers_with_latest_event": _r(float(np.mean([r["has_latest"] for r in ok if "has_latest" in r
                                                           and r.get("streaming", True)] or [math.nan])), 3),
            "client_latency_ms": {q: _r(percentile(lat, v)) for q, v in (("p50", .5), ("p95", .95), ("p99", .99))}
            | {"max": _r(max(lat)) if lat else None, "mean": _r(float(np.mean(lat))) if lat else None},
            "server_latency_ms": {q: _r(1000 * histogram_quantile(v, self.server_latency_buckets))
                                  for q, v in (("p50", .5), ("p95", .95), ("p99", .99))},
            "staleness_ms": {q: _r(percentile(warm, v)) for q, v in (("p50", .5), ("p95", .95), ("max", 1.0))},
            "freshness_s": {"probes": len(self.probes), "seen": len(fresh),
                            **{q: _r(percentile(fresh, v), 3) for q, v in (("p50", .5), ("p90", .9), ("max", 1.0))}},
            "codec": self.codec,
            "bytes_per_user": {name: round(b["payload_mean"], 1) for name, b in self.codec_bytes.items()},
            "wall_seconds": round(self.wall_s, 1),
        }

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("pop_scored")
        data.pop("pop_hits")
        data["figures"] = self.figures()
        return data


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), digits)


# -- the summary table ------------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ",.0f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return x if isinstance(x, str) else format(x, spec)


def summary_rows(r: DemoRecord) -> list[tuple[str, str]]:
    f = r.figures()
    hr, pop = f["online_hr10"], f["popularity_hr10"]
    ratio = f" (×{hr / pop:.2f})" if hr is not None and pop else ""
    cl, sv, fr, st = f["client_latency_ms"], f["server_latency_ms"], f["freshness_s"], f["staleness_ms"]
    failed = ", ".join(f"{n} {c}" for c, n in f["recommend_failed"].items()) or "none failed"
    rate = f"paced at {r.rate:g} ev/s" if r.rate else "as fast as possible"
    codec_b = r.codec_bytes.get(r.codec, {})
    return [
        ("dataset", f"{r.dataset} ({r.dataset_note})"),
        ("events produced", f"{f['events_produced']:,} ({f['events_replayed']:,} replayed {rate}, "
                            f"{f['probe_events']} freshness probes)"),
        ("events applied by the trainer", f"{_fmt(f['events_applied'])} (consumed {_fmt(f['events_consumed'])}, "
                                          f"dead-lettered {f['dead_lettered']})"),
        ("trainer throughput", f"{_fmt(f['trainer_events_per_s'])} ev/s from its first to its last event; "
                               f"caught up {_fmt(f['trainer_catchup_seconds'], '.1f')} s after the stream ended "
                               f"({f['stream_seconds']} s)"),
        ("online HR@10 (prequential)", f"{_fmt(hr, '.4f')} vs popularity {_fmt(pop, '.4f')}{ratio}, "
                                       f"{_fmt(f['prequential_scored'])} events scored"),
        ("online NDCG@10", f"{_fmt(f['online_ndcg10'], '.4f')} vs popularity {_fmt(f['popularity_ndcg10'], '.4f')}"),
        ("final loss / model version", f"{_fmt(f['final_loss'], '.3f')} / v{_fmt(f['model_version'])}"),
        ("state refreshes", f"{_fmt(f['state_refreshes'])} (codec {r.codec}, "
                            f"{_fmt(codec_b.get('payload_mean'))} B/user payload)"),
        ("Recommend calls (gRPC client)", f"{f['recommend_ok']:,} ok ({f['recommend_cold_start']} cold start), {failed}; "
                                          f"{_fmt(_pct(f['answers_with_latest_event']))} of answers during the stream "
                                          "already included the user's latest event"),
        ("Recommend latency, client", f"p50 {_fmt(cl['p50'], '.1f')} / p95 {_fmt(cl['p95'], '.1f')} / "
                                      f"p99 {_fmt(cl['p99'], '.1f')} ms"),
        ("Recommend latency, server", f"p50 {_fmt(sv['p50'], '.1f')} / p95 {_fmt(sv['p95'], '.1f')} / "
                                      f"p99 {_fmt(sv['p99'], '.1f')} ms (histogram)"),
        ("staleness of answers (stream running)", f"p50 {_fmt(st['p50'])} / p95 {_fmt(st['p95'])} ms "
                                                  "(now − time of the newest event in the served state)"),
        ("freshness, event → Recommend", f"p50 {_fmt(fr['p50'], '.2f')} / p90 {_fmt(fr['p90'], '.2f')} / "
                                         f"max {_fmt(fr['max'], '.2f')} s ({fr['seen']}/{fr['probes']} probes seen)"),
        ("wall time", f"{f['wall_seconds']} s"),
        ("shutdown", r.shutdown.get("summary", "–")),
    ]


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.0f}%"


def summary_table(r: DemoRecord) -> str:
    rows = summary_rows(r)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# -- plots ------------------------------------------------------------------------------------------


def hr_windows(r: DemoRecord) -> dict[str, list[float]]:
    """Model HR@10 per window of applied events (from the trainer's counters at each tick) and
    popularity's over the same events (recomputed by the demo)."""
    ticks = [t for t in r.ticks if not math.isnan(t.get("applied", math.nan))]
    if len(ticks) < 2:
        return {"x": [], "model": [], "popularity": [], "model_cum": [], "pop_cum": []}
    total = ticks[-1]["applied"]
    width = max(250.0, total / 30)
    xs, model, pop, model_cum, pop_cum = [], [], [], [], []
    prev = ticks[0]
    pop_cs = np.concatenate(([0], np.cumsum(r.pop_scored)))
    pop_ch = np.concatenate(([0], np.cumsum(r.pop_hits)))
    for t in ticks[1:]:
        if t["applied"] - prev["applied"] < width and t is not ticks[-1]:
            continue
        ds = t["scored"] - prev["scored"]
        if ds > 0:
            a0 = int(min(prev["applied"], len(r.pop_scored)))
            a1 = int(min(t["applied"], len(r.pop_scored)))
            ps = pop_cs[a1] - pop_cs[a0]
            xs.append(t["applied"])
            model.append((t["hits"] - prev["hits"]) / ds)
            pop.append((pop_ch[a1] - pop_ch[a0]) / ps if ps else math.nan)
            model_cum.append(t["hits"] / t["scored"] if t["scored"] else math.nan)
            pop_cum.append(pop_ch[a1] / pop_cs[a1] if pop_cs[a1] else math.nan)
        prev = t
    return {"x": xs, "model": model, "popularity": pop, "model_cum": model_cum, "pop_cum": pop_cum}


def make_plots(r: DemoRecord, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files[name.removesuffix(".png")] = name

    # 1. online HR@10 over the stream
    w = hr_windows(r)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    if w["x"]:
        ax.plot(w["x"], w["model"], "o-", color="tab:blue", ms=3, label="liverec model, per window")
        ax.plot(w["x"], w["popularity"], "o-", color="tab:gray", ms=3, label="popularity, per window")
        ax.plot(w["x"], w["model_cum"], "--", color="tab:blue", alpha=0.6, label="liverec model, cumulative")
        ax.plot(w["x"], w["pop_cum"], "--", color="tab:gray", alpha=0.6, label="popularity, cumulative")
    ax.set_xlabel("events applied by the trainer")
    ax.set_ylabel("prequential HR@10")
    ax.set_title("Online HR@10 over the stream (each event ranked before it is learned)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    save(fig, "hr10.png")

    # 2. Recommend latency
    lat = [x["latency_ms"] for x in r.recommends if x["code"] == "OK"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    if lat:
        lo, hi = max(min(lat), 0.05), max(lat)
        bins = np.geomspace(lo, hi * 1.01, 40) if hi > lo else 20
        ax.hist(lat, bins=bins, color="tab:green", alpha=0.8, label=f"client-side, {len(lat):,} calls")
        ax.set_xscale("log")
        for q, style in ((0.5, "-"), (0.99, "--")):
            v = percentile(lat, q)
            ax.axvline(v, color="black", ls=style, lw=1, label=f"client p{int(q * 100)} {v:.1f} ms")
        sp99 = histogram_quantile(0.99, r.server_latency_buckets)
        if not math.isnan(sp99):
            ax.axvline(1000 * sp99, color="tab:red", ls=":", lw=1.5, label=f"server p99 {1000 * sp99:.1f} ms (histogram)")
    ax.set_xlabel("Recommend latency (ms, log scale)")
    ax.set_ylabel("calls")
    ax.set_title("Recommend latency: real gRPC calls during the stream")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "latency.png")

    # 3. bytes per user by codec
    fig, ax = plt.subplots(figsize=(8, 4.2))
    names = list(r.codec_bytes)
    if names:
        x = np.arange(len(names))
        bench_bytes = bench_bytes_by_codec(r.bench_state)
        width = 0.4 if bench_bytes else 0.6
        ours = [r.codec_bytes[n]["payload_mean"] for n in names]
        bars = ax.bar(x - (width / 2 if bench_bytes else 0), ours, width,
                      color=["tab:orange" if n == r.codec else "tab:blue" for n in names],
                      label="this run's users (encoded here)")
        for b, v in zip(bars, ours):
            ax.annotate(f"{v:,.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        if bench_bytes:
            bench = [bench_bytes.get(n, math.nan) for n in names]
            ax.bar(x + width / 2, bench, width, color="tab:purple", alpha=0.7,
                   label=f"liverec bench state ({r.bench_state['dataset']}, its model)")
        ax.set_xticks(x, [f"{n}\n(learned)" if r.codec_bytes[n]["learned"] else n for n in names])
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_ylabel("bytes per user (payload, log scale)")
    ax.set_title(f"Per-user state bytes by codec (orange: the one this run served, {r.codec})")
    ax.grid(alpha=0.3, axis="y")
    save(fig, "bytes_per_user.png")

    # 4. freshness
    fresh = [p["freshness_s"] for p in r.probes if p.get("freshness_s") is not None]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    if fresh:
        xs = np.sort(fresh)
        ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", color="tab:purple",
                label=f"{len(xs)} probe events")
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), "o", color="tab:purple", ms=3)
        for q in (0.5, 0.9):
            v = percentile(fresh, q)
            ax.axvline(v, color="black", ls="--" if q == 0.9 else "-", lw=1, label=f"p{int(q * 100)} {v:.2f} s")
    ax.set_xlabel("seconds from producing an event to a Recommend whose state includes it")
    ax.set_ylabel("fraction of probes")
    ax.set_ylim(0, 1.05)
    ax.set_title("Freshness: event → served state (CDF)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save(fig, "freshness.png")

    # 5. throughput and lag over time
    ticks = [t for t in r.ticks if not math.isnan(t.get("applied", math.nan))]
    if len(ticks) > 2:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        t0 = ticks[0]["t"]
        ts = [t["t"] - t0 for t in ticks]
        ax.plot(ts, [t["produced"] for t in ticks], color="tab:gray", label="produced")
        ax.plot(ts, [t["applied"] for t in ticks], color="tab:blue", label="applied by the trainer")
        ax.set_xlabel("seconds")
        ax.set_ylabel("events")
        ax2 = ax.twinx()
        ax2.plot(ts, [t["produced"] - t["applied"] for t in ticks], color="tab:orange", alpha=0.7,
                 label="produced − applied")
        ax2.plot(ts, [t["lag"] for t in ticks], color="tab:red", alpha=0.6,
                 label="consumer lag gauge (trainer, ≤ 1/s)")
        ax2.set_ylabel("events behind", color="tab:red")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_title("Stream progress and consumer lag")
        save(fig, "progress.png")
    return files


# -- report.md ---------------------------------------------------------------------------------------


def write_report(r: DemoRecord, out: Path) -> Path:
    """report.json, the plots and report.md into `out`; returns the path of report.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(_clean(r.to_json()), indent=1) + "\n")
    files = make_plots(r, out)
    f = r.figures()
    lines = [
        "# liverec demo report",
        "",
        f"{r.started_at} · {r.machine} · `{r.command}`" + _load_text(r),
        "",
        "The whole platform on one machine: a local Kafka-protocol broker (Tansu), the online trainer "
        "and one gRPC serving replica as separate processes, and this demo producing the event "
        "stream, calling `Recommend` from a real gRPC client and scraping every process's Prometheus "
        "`/metrics` over HTTP.",
        "",
        "## Summary",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in summary_rows(r)],
        "",
        "## Set-up",
        "",
        f"- stream: {r.dataset} ({r.dataset_note}); event times are the moment each event was produced, "
        "so staleness and freshness read as real time",
        f"- model: {json.dumps(r.model)}; trainer micro-batches of up to {r.batch_events} events",
        f"- state codec served: `{r.codec}`",
        "- where the trainer's time went (seconds, summed over micro-batches, from "
        "`liverec_trainer_batch_seconds_sum`): " + (", ".join(f"{k} {v:,.1f}" for k, v in f["trainer_stage_seconds"].items())
                                                    or "–"),
        "- processes: " + "; ".join(f"{name} pid {p['pid']}" + (f" ({', '.join(f'{k} {v}' for k, v in p['ports'].items())})"
                                                                if p.get("ports") else "")
                                    for name, p in r.processes.items()),
        "- logs of the trainer and the replica: `logs/` next to this report",
        "",
        "## Online HR@10 over the stream",
        "",
        f"![online HR@10]({files.get('hr10', 'hr10.png')})",
        "",
        "Prequential (test-then-train): every event with an earlier event of its user is ranked against "
        "the whole catalog by the model as it was *before* learning from it. The model's curve comes "
        "from the trainer's counters (`liverec_trainer_prequential_hits_at10_total` / "
        "`_scored_total`) scraped during the run; popularity's from the demo's recomputation over the "
        "events it produced, in micro-batches of the trainer's size (ties count against the target). "
        f"Cumulative figures from the trainer itself at the end: HR@10 {_fmt(f['online_hr10'], '.4f')} "
        f"vs popularity {_fmt(f['popularity_hr10'], '.4f')} (the demo's recomputation of popularity: "
        f"{_fmt(f['popularity_hr10_demo_recomputed'], '.4f')}).",
        "",
        "## Recommend latency",
        "",
        f"![latency]({files.get('latency', 'latency.png')})",
        "",
        f"{f['recommend_ok']:,} `Recommend` calls (k=10, seen items excluded) for users the stream had just "
        "touched, from one `RecommenderClient` thread while the trainer was learning on the same CPU. "
        "Client-side: wall time of the call; server-side: the replica's "
        "`liverec_serving_request_seconds` histogram (bucket-interpolated quantiles).",
        "",
        "## Bytes per user by codec",
        "",
        f"![bytes per user]({files.get('bytes_per_user', 'bytes_per_user.png')})",
        "",
        _codec_text(r),
        "",
        "## Freshness",
        "",
        f"![freshness]({files.get('freshness', 'freshness.png')})",
        "",
        "Probe events, spread over the run: the demo produces an event for a user the stream has seen, "
        "notes its offset, and calls `Recommend` for that user (every 20 ms at first, then every ~5% of the "
        "time waited so far) until the answer's "
        "`state_version` (the offset of the newest event the served state includes) reaches it. "
        "Freshness is the time from producing the event to that answer: Kafka, the trainer's "
        "micro-batch and state refresh, the user-state topic and the replica's materialisation.",
        "",
        _probe_table(r),
    ]
    if "progress" in files:
        lines += ["", "## Stream progress", "", f"![progress]({files['progress']})"]
    lines += ["", "## A few answers", "",
              "The last answers of the run, one per user: top 10 (seen items excluded), the state version (offset of "
              "the newest event the served state includes) against the newest offset the demo had produced for that "
              "user when it asked, and the staleness the replica reported.", "",
              "| user | top items | state version | user's newest offset | staleness | model version | latency |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    last: dict[int, dict[str, Any]] = {}
    for a in r.answers:
        last.pop(a["user_id"], None)
        last[a["user_id"]] = a
    for a in list(last.values())[-8:]:
        lines.append(f"| {a['user_id']} | {', '.join(map(str, a['items'][:10]))} | "
                     f"{'cold start' if a['cold_start'] else a['state_version']} | "
                     f"{'–' if a['latest_offset'] is None else a['latest_offset']} | {a['staleness_ms']:,} ms | "
                     f"{a['model_version']} | {a['latency_ms']:.1f} ms |")
    lines += ["", "All figures, the scraped time series and every probe are in `report.json`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _load_text(r: DemoRecord) -> str:
    start, end = r.load_average.get("start"), r.load_average.get("end")
    if not start or not end:
        return ""
    return (f" · load average {start[0]:.1f} at the start, {end[0]:.1f} at the end (1 min; every process of the "
            "machine, this demo's included)")


def _codec_text(r: DemoRecord) -> str:
    if not r.codec_bytes:
        return "No users to measure."
    users = next(iter(r.codec_bytes.values()))["users"]
    rows = ["| codec | payload B/user (mean) | p99 | record B/user | at a full window | |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, b in r.codec_bytes.items():
        note = "served in this run" if name == r.codec else ("learned parts untrained here: size only"
                                                              if b["learned"] else "")
        rows.append(f"| {name} | {b['payload_mean']:,.0f} | {b['payload_p99']:,.0f} | {b['record_mean']:,.0f} | "
                    f"{b['full_window']:,} | {note} |")
    text = (f"Measured by encoding {users} of this run's users (their last `max_len` events, as the trainer "
            "keeps them) with every codec of `liverec.model.codecs` on this run's model shape; sizes depend on "
            "history length and shapes only. The record adds the state-record header and checksum.\n\n"
            + "\n".join(rows))
    bench = r.bench_state
    if bench:
        model = bench.get("model", {})
        shape = ", ".join(f"{k} {model[k]}" for k in ("dim", "layers", "heads", "max_len") if k in model)
        text += (f"\n\n`benchmarks/results/state.json` (`liverec bench state`, {bench['date']}) is there too: "
                 f"{bench['dataset']}, {bench.get('users')} users, model {shape}. Its default variant of each "
                 "codec is the purple bar; all its variants, with accuracy relative to `full`:\n\n"
                 "| variant | codec | bytes/user | HR@10 vs full |\n| --- | --- | --- | --- |\n"
                 + "\n".join(f"| {row['variant']} | {row['codec']} | {row['bytes_mean']:,.0f} | "
                             f"{_fmt(row['hr10_ratio'], '.3f')} |" for row in bench["rows"]))
    else:
        text += "\n\n(`benchmarks/results/state.json` was not there, so only this run's measurement is shown.)"
    return text


def _probe_table(r: DemoRecord) -> str:
    if not r.probes:
        return "No probes were sent."
    rows = ["| # | sent at (s) | user | partition/offset | freshness | phase |", "| --- | --- | --- | --- | --- | --- |"]
    for i, p in enumerate(r.probes, 1):
        fresh = f"{p['freshness_s']:.3f} s" if p.get("freshness_s") is not None else "not seen"
        rows.append(f"| {i} | {p['sent_at_s']:.1f} | {p['user_id']} | {p['partition']}/{p['offset']} | {fresh} | "
                    f"{p['phase']} |")
    return "\n".join(rows)


def _clean(x: Any) -> Any:
    """Plain JSON: NaN as null, numpy scalars and arrays as numbers and lists, tuples as lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
