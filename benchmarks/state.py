"""`liverec bench state`: every per-user state codec on one model, one table (MALLOC-style).

Model. A `SequentialRecommender` trained here on the ml-100k training split, SASRec-style
(windows of `max_len + 1` events, next-item sampled softmax with in-batch and uniform
negatives, a few epochs). A plain `nn.Embedding` is the item table: the embedding store is not
what this benchmark measures. The learned codecs (`summary`, `collective`) are then fitted on
the training split's caches with their auxiliary (distillation) losses, the model frozen, and
every codec is evaluated with the same model.

Measured per codec:
- bytes per user (mean, p99) of the ml-100k users' states (their last `max_len` training
  events) and the ratio to `full`;
- HR@10 / NDCG@10, full-catalog leave-one-out: each user's last event held out, the whole
  catalog ranked from the decoded state, the user's training items excluded; ratio to `full`;
- refresh µs per event: the codec's own work to take one new event into a user's state
  (`append` of one row for incremental codecs, `encode` of the user's cache for the others),
  and the same including the model work it needs (decode + `extend` by one event + append;
  or `encode` of the `max_len` history + codec encode), both per user in a batch of users;
- decode + score µs per request: one user's payload decoded and the full catalog scored
  (query token + retrieval head + top-10), batch of one;
- bytes per user at history lengths 50, 200, 1,000 and 10,000 (synthetic histories encoded by
  chunked `extend` with a cache capacity as large as the history; RoPE positions extend).
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

from liverec.model import EncoderConfig, KVCache, ModelConfig, SequentialRecommender
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
    fit_steps: int
    fit_batch: int
    timing_users: int


FULL_PLAN = Plan(epochs=6, batch_windows=64, negatives=512, lr=3e-3, fit_steps=300, fit_batch=128, timing_users=64)
QUICK_PLAN = Plan(epochs=2, batch_windows=64, negatives=512, lr=3e-3, fit_steps=60, fit_batch=128, timing_users=16)
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


def train_model(data: Data, plan: Plan, seed: int = 0, log: Callable[[str], None] = print) -> tuple[SequentialRecommender, nn.Embedding]:
    """SASRec-style training of the encoder and retrieval head: shuffled windows, a query token
    after every slot, next-item sampled softmax (uniform negatives, logQ-corrected), cosine LR.

    The target-attention head's loss (in `SequentialRecommender.forward`) is left out: it costs
    twice the encoder's time on this CPU, and the benchmark ranks with the retrieval head.
    """
    torch.manual_seed(seed)
    model = SequentialRecommender(MODEL)
    table = nn.Embedding(data.num_items, MODEL.encoder.dim)
    nn.init.normal_(table.weight, std=0.1)
    items, valid = training_windows(data, MODEL.encoder.max_len)
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
                in_batch=False, temperature=MODEL.temperature,
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


@torch.no_grad()
def quality(model: SequentialRecommender, table: nn.Embedding, data: Data, cache: KVCache) -> dict[str, float]:
    """HR@10 / NDCG@10, full catalog, the user's training items excluded."""
    item_rows = model.item_side(table.weight).retrieval
    scores = model.retrieval_scores(model.user_hidden(cache), item_rows)
    lengths = np.diff(data.train_indptr)[data.users]
    owner = torch.from_numpy(np.repeat(np.arange(len(data.users)), lengths))
    seen = torch.from_numpy(np.concatenate([data.train_items[data.train_indptr[u]:data.train_indptr[u + 1]] for u in data.users]))
    exclude = torch.zeros_like(scores, dtype=torch.bool)
    exclude[owner, seen] = True
    ranks = target_ranks(scores, torch.from_numpy(data.targets), exclude)
    return {"HR@10": hit_rate(ranks, K).mean().item(), "NDCG@10": ndcg(ranks, K).mean().item()}
