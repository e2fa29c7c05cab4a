"""Ranking metrics from scores: HR@k, NDCG@k, MRR, vectorised over a batch.

One function computes each target's rank; the metrics are functions of the rank, returned per
row so that callers can average them however they aggregate (a running prequential mean, a
leave-one-out mean over users). The full-catalog protocol passes `[B, catalog]` scores and an
exclusion mask of seen items; the sampled protocol passes `[B, 1 + 100]` scores with targets 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def target_ranks(scores: Tensor, targets: Tensor, exclude: Tensor | None = None) -> Tensor:
    """0-based rank `[B]` of `targets [B]` (column indices) within `scores [B, N]`.

    `exclude [B, N]` (True = not a competitor, e.g. an item the user has already seen) drops
    items from the ranking; the target itself is never excluded. Ties count against the target
    (an item scoring equal to it ranks above it), so a constant scorer gets no free hits. A NaN
    score counts as -inf, so a NaN target ranks last rather than first.
    """
    scores = scores.float().nan_to_num(nan=float("-inf"))
    target_score = scores.gather(1, targets[:, None])
    above = scores >= target_score
    if exclude is not None:
        above &= ~exclude
    above.scatter_(1, targets[:, None], False)
    return above.sum(1)


def hit_rate(ranks: Tensor, k: int) -> Tensor:
    """1.0 where the target is in the top k, else 0.0; `[B]`."""
    return (ranks < k).float()


def ndcg(ranks: Tensor, k: int) -> Tensor:
    """NDCG@k with one relevant item: 1 / log2(rank + 2) inside the top k, else 0; `[B]`."""
    return torch.where(ranks < k, 1.0 / torch.log2(ranks.float() + 2.0), torch.zeros_like(ranks, dtype=torch.float))


def reciprocal_rank(ranks: Tensor) -> Tensor:
    """1 / (rank + 1), over the whole list (MRR is its mean); `[B]`."""
    return 1.0 / (ranks.float() + 1.0)


def summarize(ranks: Tensor, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """Means over the batch: `HR@k` and `NDCG@k` for each k, and `MRR`."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"HR@{k}"] = hit_rate(ranks, k).mean().item()
        out[f"NDCG@{k}"] = ndcg(ranks, k).mean().item()
    out["MRR"] = reciprocal_rank(ranks).mean().item()
    return out


def seen_mask(history: Tensor, valid: Tensor, num_items: int) -> Tensor:
    """`[B, num_items]` bool, True for every item in a user's (padded) history `[B, L]`."""
    counts = torch.zeros(history.shape[0], num_items, dtype=torch.long, device=history.device)
    return counts.scatter_add_(1, torch.where(valid, history, 0), valid.long()) > 0
