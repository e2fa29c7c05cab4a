"""Training losses: sampled softmax with logQ correction for retrieval, pointwise BCE for ranking.

Both compute in float32 whatever the input dtype, go through logsumexp/softplus (never exp or
log of a probability), and return a finite mean; an empty batch gives a zero that still has a
graph, so a trainer step never has to special-case it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sampled_softmax_loss(
    user_vec: Tensor,
    pos_emb: Tensor,
    pos_ids: Tensor,
    neg_emb: Tensor,
    neg_ids: Tensor,
    log_q_pos: Tensor,
    log_q_neg: Tensor,
    *,
    in_batch: bool = True,
    temperature: float = 1.0,
) -> Tensor:
    """Next-item cross-entropy against an importance-sampled estimate of the full-catalog softmax.

    user_vec `[M, D]`, pos_emb `[M, D]` and pos_ids `[M]`: each row's user and target item;
    neg_emb `[N, D]`, neg_ids `[N]`: negatives drawn by the caller (uniformly, typically; N may
    be 0); log_q_pos `[M]`: log probability that one in-batch draw is that row's item (its
    frequency, e.g. count / total from the store); log_q_neg `[N]`: log probability of each
    negative under its sampler (log(1/catalog) for uniform).

    The denominator of the full softmax is exp(s_pos) plus a sum over every other item; each
    negative source estimates that sum by importance sampling, subtracting log(draws * q) from
    each sampled logit (logQ correction: popular items, over-represented among in-batch
    negatives, are pushed down less), and the sources' estimates are averaged (another
    -log(#sources)). With `in_batch`, every other row's positive is a negative for this row.
    A negative with the same id as the row's positive (an accidental hit, e.g. two rows with
    the same target) is masked out. Returns the mean over rows.
    """
    if user_vec.shape[0] == 0:
        return user_vec.sum() * 0.0
    u, p, n = user_vec.float(), pos_emb.float(), neg_emb.float()
    rows = u.shape[0]
    pos_logit = (u * p).sum(-1) / temperature
    sources = []
    if n.shape[0] > 0:
        neg = u @ n.T / temperature - (log_q_neg.float() + math.log(n.shape[0]))[None, :]
        sources.append(neg.masked_fill(neg_ids[None, :] == pos_ids[:, None], float("-inf")))
    if in_batch and rows > 1:
        other = u @ p.T / temperature - (log_q_pos.float() + math.log(rows - 1))[None, :]
        sources.append(other.masked_fill(pos_ids[None, :] == pos_ids[:, None], float("-inf")))
    logits = torch.cat([pos_logit[:, None]] + [s - math.log(len(sources)) for s in sources], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos_logit).mean()


def bce_ranking_loss(pos_logits: Tensor, neg_logits: Tensor, neg_keep: Tensor | None = None) -> Tensor:
    """Pointwise binary cross-entropy for the ranking head: positive -> 1, negatives -> 0.

    pos_logits `[M]`, neg_logits `[M, K]`, neg_keep `[M, K]` (False drops a negative, e.g. one
    equal to the positive). Pointwise rather than listwise so the head's scores are calibrated
    click probabilities, comparable across requests. Each row weighs the same: its positive
    term plus the mean of its kept negatives' terms.
    """
    if pos_logits.shape[0] == 0:
        return pos_logits.sum() * 0.0
    pos_term = F.softplus(-pos_logits.float())
    neg_term = F.softplus(neg_logits.float())
    if neg_keep is None:
        neg_mean = neg_term.mean(1)
    else:
        keep = neg_keep.float()
        neg_mean = (neg_term * keep).sum(1) / keep.sum(1).clamp(min=1.0)
    return (pos_term + neg_mean).mean()
