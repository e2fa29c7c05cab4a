"""`liverec bench state`: every per-user state codec on one model, one table (MALLOC-style).

Model. A `SequentialRecommender` (dim 64, 2 layers, 2 heads, max_len 50) trained here on the
ml-100k training split, SASRec-style: windows of `max_len + 1` events, a query token after
every slot, next-item sampled softmax over uniform negatives, 6 epochs. A plain `nn.Embedding`
is the item table (the embedding store is not what this benchmark measures), started from a
PPMI-SVD of item co-occurrence, without which the model stays below popularity for well over
the epochs this CPU budget allows. Only the retrieval loss is trained (the ranking head's loss
would double the time and ranking is not measured here). The learned codecs (`summary`,
`collective`) are then fitted on the training split's caches with their auxiliary
(distillation) losses, the model frozen, and every codec is evaluated with the same model.

Measured per codec:
- bytes per user (mean, p99) of the ml-100k users' states (their last `max_len` training
  events) and the ratio to `full`;
- HR@10 / NDCG@10, full-catalog leave-one-out: each user's last event held out, the whole
  catalog ranked from the decoded state, the user's training items excluded; ratio to `full`;
  and the share of `full`'s top-10 list the codec's list keeps (agreement with `full`: the
  HR/NDCG ratios over ~1,000 held-out events move by a percent or two on a few users);
- refresh µs per event: the codec's own work to take one new event into a user's state
  (`append` of one row for incremental codecs, `encode` of the user's cache for the others),
  and the same including the model work it needs (decode + `extend` by one event + append;
  or `encode` of the `max_len` history + codec encode), per user in a batch of 64 users;
- decode + score µs per request: one user's payload decoded and the full catalog scored
  (query token + retrieval head + top-10), batch of one;
- bytes per user at history lengths 50, 200, 1,000 and 10,000 (synthetic histories encoded by
  chunked `extend` with a cache capacity as large as the history; RoPE positions extend).
Times are the best of 5 runs on one thread. A popularity baseline (no state) is reported too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.report import cpu_model
from liverec.model import EncoderConfig, KVCache, ModelConfig, SequentialRecommender
from liverec.model.codecs import StateCodec, codec_from_config, fit_codec, last_events
from liverec.model.losses import sampled_softmax_loss
from liverec.model.metrics import hit_rate, ndcg, target_ranks

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATASET = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k")
HISTORY_LENGTHS = (50, 200, 1_000, 10_000)
K = 10
ACTION = 5  # every ml-100k event is a rating (Action.RATE)


@dataclass(frozen=True)
class Plan:
    epochs: int
    batch_windows: int
    negatives: int
    lr: float
    fit_steps: int  # summary: tokens start random, distillation does all the work
    collective_steps: int  # collective: k-means / PCA start, distillation only polishes
    kmeans_rows: int
    fit_batch: int
    timing_users: int


FULL_PLAN = Plan(epochs=6, batch_windows=64, negatives=512, lr=3e-3, fit_steps=400, collective_steps=20,
                 kmeans_rows=16384, fit_batch=128, timing_users=64)
QUICK_PLAN = Plan(epochs=1, batch_windows=64, negatives=512, lr=3e-3, fit_steps=60, collective_steps=3,
                  kmeans_rows=4096, fit_batch=128, timing_users=16)
#: In-batch negatives cost M^2 for M targets (thousands per batch here): uniform negatives only.
MODEL = ModelConfig(encoder=EncoderConfig(dim=64, layers=2, heads=2, max_len=50, dropout=0.2), in_batch_negatives=False)


# -- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """Leave-one-out split with dense item indices `0..num_items-1`.

    train_items/train_indptr: every user's training events (CSR, time order);
    users: the evaluated users' CSR rows; targets: their held-out item.
    """

    num_items: int
    train_items: np.ndarray
    train_indptr: np.ndarray
    users: np.ndarray
    targets: np.ndarray
    item_counts: np.ndarray


def load_data(path: str) -> Data:
    from liverec.platform.datasets import load_dataset

    seq = load_dataset(path).table.per_user_sequences()
    _, items = np.unique(seq.item_id, return_inverse=True)
    lengths = seq.lengths()
    held = seq.indptr[1:] - 1
    keep = np.ones(len(items), dtype=bool)
    evaluated = lengths >= 2
    keep[held[evaluated]] = False
    train_lengths = lengths - evaluated
    indptr = np.concatenate(([0], np.cumsum(train_lengths)))
    train_items = items[keep]
    num_items = int(items.max()) + 1
    return Data(
        num_items=num_items,
        train_items=train_items,
        train_indptr=indptr,
        users=np.flatnonzero(evaluated),
        targets=items[held[evaluated]],
        item_counts=np.bincount(train_items, minlength=num_items),
    )


def windows(data: Data, rows: np.ndarray, ends: np.ndarray, width: int) -> tuple[Tensor, Tensor]:
    """Left-padded item windows `[N, width]` ending at `ends` (exclusive) of CSR rows `rows`."""
    starts = data.train_indptr[rows]
    pos = ends[:, None] - width + np.arange(width)[None, :]
    valid = pos >= starts[:, None]
    items = np.where(valid, data.train_items[np.where(valid, pos, 0)], 0)
    return torch.from_numpy(items), torch.from_numpy(valid)


def training_windows(data: Data, max_len: int) -> tuple[Tensor, Tensor]:
    """Each user's training events cut from the end into overlapping windows of `max_len + 1`."""
    lengths = np.diff(data.train_indptr)
    count = np.where(lengths >= 2, -(-(lengths - 1) // max_len), 0)
    owner = np.repeat(np.arange(len(lengths)), count)
    j = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    ends = data.train_indptr[owner + 1] - j * max_len
    return windows(data, owner, ends, max_len + 1)


def eval_histories(data: Data, max_len: int) -> tuple[Tensor, Tensor]:
    return windows(data, data.users, data.train_indptr[data.users + 1], max_len)


# -- the model -------------------------------------------------------------------------------------


def item_init(data: Data, dim: int, span: int = 5, std: float = 0.1) -> Tensor:
    """Item vectors from a truncated SVD of the PPMI of item co-occurrence within
    `span` events of each other in the training sequences (weight 1/distance): a cheap
    item2vec. Started from these, 6 epochs reach about twice popularity's NDCG@10 on ml-100k;
    from a random table the model stays below popularity for well over 10 epochs, which this
    benchmark cannot afford on a shared 2-core CPU."""
    n = data.num_items
    owner = np.repeat(np.arange(len(data.train_indptr) - 1), np.diff(data.train_indptr))
    counts = np.zeros(n * n)
    for k in range(1, span + 1):
        same = owner[:-k] == owner[k:]
        a, b = data.train_items[:-k][same], data.train_items[k:][same]
        counts += np.bincount(a * n + b, minlength=n * n) / k
    c = counts.reshape(n, n)
    c = c + c.T
    row = c.sum(1, keepdims=True)
    with np.errstate(divide="ignore"):
        ppmi = np.maximum(np.log(c * c.sum() / np.maximum(row @ row.T, 1e-12)), 0.0)
    torch.manual_seed(0)
    u, sv, _ = torch.svd_lowrank(torch.from_numpy(ppmi).float(), q=dim + 16, niter=3)
    emb = u[:, :dim] * sv[:dim].sqrt()
    return emb / emb.std().clamp(min=1e-12) * std


def train_model(
    data: Data, plan: Plan, seed: int = 0, log: Callable[[str], None] = print, config: ModelConfig = MODEL,
    init_items: Tensor | None = None,
) -> tuple[SequentialRecommender, nn.Embedding]:
    """SASRec-style training of the encoder and retrieval head: shuffled windows, a query token
    after every slot, next-item sampled softmax (uniform negatives, logQ-corrected), cosine LR.

    The target-attention head's loss (in `SequentialRecommender.forward`) is left out: it costs
    twice the encoder's time on this CPU, and the benchmark ranks with the retrieval head.
    """
    torch.manual_seed(seed)
    model = SequentialRecommender(config)
    table = nn.Embedding(data.num_items, config.encoder.dim)
    nn.init.normal_(table.weight, std=0.1)
    if init_items is not None:
        with torch.no_grad():
            table.weight.copy_(init_items)
    items, valid = training_windows(data, config.encoder.max_len)
    log_q_all = torch.from_numpy(np.log(np.maximum(data.item_counts, 1) / data.item_counts.sum())).float()
    log_q_neg = torch.full((plan.negatives,), -math.log(data.num_items))
    opt = torch.optim.Adam([*model.parameters(), *table.parameters()], lr=plan.lr)
    total = math.ceil(len(items) / plan.batch_windows) * plan.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(plan.epochs):
        losses = []
        for batch in torch.randperm(len(items), generator=gen).split(plan.batch_windows):
            ids, v = items[batch], valid[batch]
            emb = table(ids)
            out = model.encoder(emb[:, :-1], torch.full_like(ids[:, :-1], ACTION), v[:, :-1], hidden=False)
            mask = v[:, 1:] & v[:, :-1]
            neg = torch.randint(data.num_items, (plan.negatives,), generator=gen)
            assert out.query_hidden is not None
            loss = sampled_softmax_loss(
                model.retrieval.user_side(out.query_hidden[mask]), model.retrieval.item_side(emb[:, 1:][mask]),
                ids[:, 1:][mask], model.retrieval.item_side(table(neg)), neg, log_q_all[ids[:, 1:][mask]], log_q_neg,
                in_batch=False, temperature=config.temperature,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        log(f"  epoch {epoch + 1}/{plan.epochs}: loss {np.mean(losses):.3f}")
    model.eval()
    return model, table


@torch.no_grad()
def encode_histories(model: SequentialRecommender, table: nn.Embedding, items: Tensor, valid: Tensor) -> KVCache:
    return model.encode(table(items), torch.full_like(items, ACTION), valid)


def eval_cache(model: SequentialRecommender, table: nn.Embedding, data: Data) -> KVCache:
    items, valid = eval_histories(data, MODEL.encoder.max_len)
    return encode_histories(model, table, items, valid)


def seen_mask(data: Data) -> Tensor:
    """`[users, items]` True where the evaluated user has the item in its training events."""
    lengths = np.diff(data.train_indptr)[data.users]
    owner = torch.from_numpy(np.repeat(np.arange(len(data.users)), lengths))
    seen = np.concatenate([data.train_items[data.train_indptr[u]:data.train_indptr[u + 1]] for u in data.users])
    seen = torch.from_numpy(seen)
    mask = torch.zeros(len(data.users), data.num_items, dtype=torch.bool)
    mask[owner, seen] = True
    return mask


@torch.no_grad()
def quality(
    model: SequentialRecommender, item_rows: Tensor, data: Data, exclude: Tensor, cache: KVCache
) -> tuple[dict[str, float], Tensor]:
    """HR@10 / NDCG@10, full catalog, the user's training items excluded; and each user's
    top-10 list under the same exclusion (to compare codecs' lists with `full`'s)."""
    scores = model.retrieval_scores(model.user_hidden(cache), item_rows)
    ranks = target_ranks(scores, torch.from_numpy(data.targets), exclude)
    top = scores.masked_fill(exclude, -math.inf).topk(K, dim=1).indices
    return {"HR@10": hit_rate(ranks, K).mean().item(), "NDCG@10": ndcg(ranks, K).mean().item()}, top


def top10_overlap(top: Tensor, reference: Tensor) -> float:
    """Mean fraction of `full`'s top-10 list that a codec's list also holds: agreement with
    `full`, far less noisy than the ratios of HR/NDCG over a thousand held-out events."""
    return float((top[:, :, None] == reference[:, None, :]).any(2).float().mean())


# -- the codecs ------------------------------------------------------------------------------------


#: (row label, codec name, config params): every codec, with the variants the table compares.
CODECS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("full", "full", {}),
    ("full-bf16", "full", {"dtype": "bfloat16"}),
    ("int8", "int8", {}),
    ("window-16", "window", {"window": 16}),
    ("pages-4x4", "pages", {"page_size": 4, "pages": 4, "recent_pages": 1}),
    ("summary-8", "summary", {"tokens": 8}),
    ("collective-4096x2-r4", "collective", {"pool_size": 4096, "rank": 4, "groups": 2}),
    ("collective-256-r2", "collective", {"pool_size": 256, "rank": 2, "groups": 1}),
)


def fit_caches(model: SequentialRecommender, table: nn.Embedding, data: Data, batch: int) -> list[KVCache]:
    """Full caches of the training windows' histories (no held-out event), in batches."""
    items, valid = training_windows(data, MODEL.encoder.max_len)
    return [
        encode_histories(model, table, items[i:i + batch, :-1], valid[i:i + batch, :-1])
        for i in range(0, len(items), batch)
    ]


def timed(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Best of `repeats` runs of `fn()` in seconds, after one warm-up: on a CPU shared with other
    processes the minimum is the reproducible figure (the others measure the neighbours)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return float(min(samples))


@torch.no_grad()
def refresh_costs(
    codec: StateCodec, model: SequentialRecommender, table: nn.Embedding, data: Data, users: int
) -> dict[str, float]:
    """µs per event for `users` users that each get one new event (see the module docstring)."""
    items, valid = eval_histories(data, MODEL.encoder.max_len)
    items, valid = items[:users], valid[:users]
    hist_items, hist_valid = items[:, 1:], valid[:, 1:]  # the last max_len - 1 events ...
    new_items = items[:, -1:]  # ... then the newest as the new event
    cache = encode_histories(model, table, items[:, :-1], valid[:, :-1])
    emb, actions = table(new_items), torch.full_like(new_items, ACTION)
    ones = torch.ones(users, dtype=torch.long)
    if codec.incremental:
        payloads = codec.encode(cache, model)
        _, ext = model.encoder.extend(cache, emb, actions)
        new = last_events(ext, ones)
        codec_only = timed(lambda: codec.append(payloads, new))

        def with_model() -> None:
            decoded = codec.decode(payloads)
            _, extended = model.encoder.extend(decoded, emb, actions)
            codec.append(payloads, last_events(extended, ones))

        total = timed(with_model)
    else:
        full = encode_histories(model, table, hist_items, hist_valid)
        codec_only = timed(lambda: codec.encode(full, model))
        total = timed(lambda: codec.encode(encode_histories(model, table, hist_items, hist_valid), model))
    return {"refresh_us_per_event": codec_only / users * 1e6, "refresh_with_model_us_per_event": total / users * 1e6}


@torch.no_grad()
def serve_cost(
    codec: StateCodec, model: SequentialRecommender, item_rows: Tensor, payloads: Sequence[bytes], requests: int
) -> float:
    """µs per request: decode one user's payload, score the whole catalog, take the top 10."""
    picks = payloads[:requests]

    def run() -> None:
        for p in picks:
            cache = codec.decode([p])
            model.retrieval_scores(model.user_hidden(cache), item_rows).topk(K, dim=1)

    return timed(run) / len(picks) * 1e6


@torch.no_grad()
def long_history(model: SequentialRecommender, length: int, seed: int, chunk: int = 500) -> KVCache:
    """One synthetic user of `length` random events, encoded by chunked `extend` (capacity = length)."""
    gen = torch.Generator().manual_seed(seed)
    dim = MODEL.encoder.dim
    cache = KVCache.empty(MODEL.encoder, 1)
    done = 0
    while done < length:
        n = min(chunk, length - done)
        emb = torch.randn(1, n, dim, generator=gen) * 0.1
        _, cache = model.encoder.extend(cache, emb, torch.full((1, n), ACTION, dtype=torch.long), capacity=length)
        done += n
    return cache


# -- the run ---------------------------------------------------------------------------------------


def run(dataset: str, plan: Plan, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    load_start = os.getloadavg()
    torch.manual_seed(0)
    data = load_data(dataset)
    log(f"data: {len(data.users)} users, {data.num_items} items, {len(data.train_items)} training events")
    log("training the model (SASRec-style, retrieval loss; item table started from PPMI eigenvectors)")
    model, table = train_model(data, plan, log=log, init_items=item_init(data, MODEL.encoder.dim))
    for p in [*model.parameters(), *table.parameters()]:
        p.requires_grad_(False)
    cache = eval_cache(model, table, data)
    item_rows = model.item_side(table.weight).retrieval
    exclude = seen_mask(data)
    _, reference = quality(model, item_rows, data, exclude, cache)
    caches = fit_caches(model, table, data, plan.fit_batch)
    rows: list[dict[str, Any]] = []
    for label, name, params in CODECS:
        codec = codec_from_config(name, MODEL, **params)
        fit_s = 0.0
        if codec.module is not None:
            start = time.perf_counter()
            steps = plan.collective_steps if name == "collective" else plan.fit_steps
            losses = fit_codec(codec, model, caches, item_rows, steps=steps, items_per_step=min(data.num_items, 2048),
                                init_rows=plan.kmeans_rows)
            fit_s = time.perf_counter() - start
            first, last = np.mean(losses[:10]), np.mean(losses[-10:])
            log(f"  fitted {label} in {fit_s:.1f}s: auxiliary loss {first:.2e} -> {last:.2e}")
        payloads = codec.encode(cache, model)
        sizes = np.array([len(p) for p in payloads])
        assert all(s == codec.bytes_per_user(int(n)) for s, n in zip(sizes, cache.lengths.tolist(), strict=True))
        decoded = codec.decode(payloads)
        metrics, top = quality(model, item_rows, data, exclude, decoded)
        row: dict[str, Any] = {
            "codec": label, "name": name, "params": params, "incremental": codec.incremental,
            "bytes_mean": float(sizes.mean()), "bytes_p99": float(np.percentile(sizes, 99)),
            **metrics,
            "top10_overlap": top10_overlap(top, reference),
            **refresh_costs(codec, model, table, data, plan.timing_users),
            "decode_score_us_per_request": serve_cost(codec, model, item_rows, payloads, plan.timing_users),
            "fit_s": fit_s,
            "cost": {"refresh": codec.cost.refresh, "serve": codec.cost.serve},
        }
        row["bytes_at_length"] = {}
        for length in HISTORY_LENGTHS:
            size = len(codec.encode(long_history(model, length, seed=length), model)[0])
            assert size == codec.bytes_per_user(length)
            row["bytes_at_length"][str(length)] = size
        rows.append(row)
        log(f"  {label}: {row['bytes_mean']:.0f} B, NDCG@10 {row['NDCG@10']:.4f}, "
            f"top-10 overlap {row['top10_overlap']:.4f}")
    pop_scores = torch.from_numpy(data.item_counts).float()[None].expand(len(data.users), -1)
    pop_ranks = target_ranks(pop_scores, torch.from_numpy(data.targets), exclude)
    popularity = {"HR@10": hit_rate(pop_ranks, K).mean().item(), "NDCG@10": ndcg(pop_ranks, K).mean().item()}
    full = rows[0]
    for row in rows:
        row["bytes_ratio"] = row["bytes_mean"] / full["bytes_mean"]
        row["HR@10_ratio"] = row["HR@10"] / full["HR@10"] if full["HR@10"] else math.nan
        row["NDCG@10_ratio"] = row["NDCG@10"] / full["NDCG@10"] if full["NDCG@10"] else math.nan
    small = [r for r in rows if r["bytes_ratio"] <= 0.01 and r["NDCG@10_ratio"] >= 0.99]
    flat = {
        r["codec"]: r["bytes_at_length"]["200"] == r["bytes_at_length"]["10000"]
        for r in rows if r["name"] in ("pages", "summary")
    }
    return {
        "benchmark": "state",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "processor": platform.machine(), "cpu_model": cpu_model(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "dataset": dataset,
        "model": {"dim": MODEL.encoder.dim, "layers": MODEL.encoder.layers, "heads": MODEL.encoder.heads,
                  "max_len": MODEL.encoder.max_len, "epochs": plan.epochs,
                  "item_table": "nn.Embedding started from PPMI-SVD (not the embedding store)",
                  "trained_losses": "retrieval sampled softmax only (ranking head untrained; not measured)"},
        "users": len(data.users),
        "items": data.num_items,
        "rows": rows,
        "popularity_baseline": popularity,
        "targets": {
            "small_and_good": {"bytes_ratio_max": 0.01, "ndcg_ratio_min": 0.99,
                               "met_by": [r["codec"] for r in small], "met": bool(small)},
            "flat_bytes_200_to_10000": {"codecs": flat, "met": bool(flat) and all(flat.values())},
        },
        "seconds": time.perf_counter() - started,
    }


def format_table(result: dict[str, Any]) -> str:
    w = max(len(r["codec"]) for r in result["rows"]) + 1
    lengths = " ".join(f"{'@' + str(n):>9}" for n in HISTORY_LENGTHS)
    head = (f"{'codec':<{w}} {'B/user':>8} {'p99':>8} {'ratio':>7} {'HR@10':>7} {'NDCG@10':>8} {'ndcg/full':>9} "
            f"{'top10=':>6} {'refresh':>8} {'+model':>8} {'serve':>8} {lengths}")
    machine = result["machine"]
    lines = [
        f"state codecs on {Path(result['dataset']).name}: {result['users']} users, {result['items']} items "
        f"(load {machine['loadavg_start'][0]:.1f}->{machine['loadavg_end'][0]:.1f}, {result['seconds']:.0f}s)",
        "ratio: bytes vs full; top10=: share of full's top-10 list kept; refresh / +model / serve in µs: per event, "
        "per event incl. the model work, per request (decode + full-catalog top-10); @N: bytes at history length N",
        head,
    ]
    for r in result["rows"]:
        at = " ".join(f"{r['bytes_at_length'][str(n)]:>9}" for n in HISTORY_LENGTHS)
        lines.append(
            f"{r['codec']:<{w}} {r['bytes_mean']:>8.0f} {r['bytes_p99']:>8.0f} {r['bytes_ratio']:>7.4f} "
            f"{r['HR@10']:>7.4f} {r['NDCG@10']:>8.4f} {r['NDCG@10_ratio']:>9.3f} {r['top10_overlap']:>6.4f} "
            f"{r['refresh_us_per_event']:>8.1f} {r['refresh_with_model_us_per_event']:>8.1f} "
            f"{r['decode_score_us_per_request']:>8.0f} {at}"
        )
    pop = result["popularity_baseline"]
    lines.append(f"popularity baseline (no state, 0 B/user): HR@10 {pop['HR@10']:.4f}, NDCG@10 {pop['NDCG@10']:.4f}")
    t = result["targets"]
    small = t["small_and_good"]
    met = "met by " + ", ".join(small["met_by"]) if small["met"] else "NOT met"
    flat = "met" if t["flat_bytes_200_to_10000"]["met"] else "NOT met"
    lines.append(f"target <=1% of full bytes with >=99% of its NDCG@10: {met}; "
                 f"summary/pages bytes flat 200 -> 10,000: {flat}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    rows = result["rows"]
    x = [r["bytes_mean"] for r in rows]
    ax.scatter(x, [r["NDCG@10_ratio"] for r in rows], s=40, label="NDCG@10 / full's")
    ax.scatter(x, [r["top10_overlap"] for r in rows], s=40, marker="x", label="share of full's top-10 kept")
    placed: dict[int, int] = {}  # codecs at the same bytes (window, pages) get stacked labels
    for r in rows:
        k = placed[round(r["bytes_mean"])] = placed.get(round(r["bytes_mean"]), -1) + 1
        ax.annotate(r["codec"], (r["bytes_mean"], r["NDCG@10_ratio"]), textcoords="offset points",
                    xytext=(5, 4 - 10 * k), fontsize=7)
    ax.axvline(0.01 * rows[0]["bytes_mean"], color="grey", ls=":", lw=1)
    ax.axhline(0.99, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per user (mean, log scale)")
    ax.set_ylabel("quality relative to full")
    ax.set_title(f"State codecs on {Path(result['dataset']).name} (dotted: 1% of full's bytes, 99% of its quality)",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="liverec bench state", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help="dataset directory or file (default ../shared/data/ml-100k)")
    parser.add_argument("--quick", action="store_true", help="short run: one epoch, fewer fitting steps and timings")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (the log and table go to stderr)")
    parser.add_argument("--output", type=Path, default=None,
                        help="results file (default benchmarks/results/state.json, state-quick.json with --quick)")
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "--":  # `liverec bench state -- --quick` passes the separator through
        argv = argv[1:]
    args = parser.parse_args(argv)
    out = sys.stderr if args.json else sys.stdout

    def log(message: str) -> None:
        print(message, file=out, flush=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors; a second thread only contends on a shared 2-core box
    try:
        result = run(args.dataset, QUICK_PLAN if args.quick else FULL_PLAN, args.quick, log)
    finally:
        torch.set_num_threads(threads)
    output = args.output or RESULTS / ("state-quick.json" if args.quick else "state.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, output.with_name(output.stem.replace("state", "state_quality_vs_bytes") + ".png"))
    log(format_table(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
