"""Distillation: the auxiliary loss that trains a learned codec to stand in for the full cache.

The teacher is the model reading the full cache; the student is the same model reading the
codec's (differentiable) reconstruction. The student should give the same user vector and the
same scores, so the loss is

    MSE(user hidden)                           (scale-free: divided by the teacher's variance)
  + KL(teacher || student) of retrieval logits over the given item rows (the batch's items)
  + MSE of target-attention logits on the given candidates

The teacher side is computed without gradients; gradients reach the codec's parameters (and the
model's, unless the caller freezes them or passes a detached cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from liverec.model.encoder import KVCache

if TYPE_CHECKING:
    from liverec.model.recommender import SequentialRecommender


def distillation_loss(
    model: SequentialRecommender,
    teacher: KVCache,
    student: KVCache,
    item_rows: Tensor | None = None,
    rank_rows: Tensor | None = None,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Tensor:
    """Student-vs-teacher loss. `item_rows [N, D]`: `ItemSide.retrieval` rows to compare
    retrieval logits over (e.g. the batch's targets and negatives); `rank_rows [B, C, 2D]`:
    `ItemSide.ranking` rows of candidates to compare ranking logits on."""
    w_hidden, w_retrieval, w_rank = weights
    with torch.no_grad():
        h_t = model.user_hidden(teacher)
    h_s = model.user_hidden(student)
    loss = w_hidden * F.mse_loss(h_s, h_t) / h_t.var().clamp(min=1e-8)
    if item_rows is not None and w_retrieval:
        temp = model.config.temperature
        with torch.no_grad():
            t = (model.retrieval_scores(h_t, item_rows) / temp).log_softmax(-1)
        s = (model.retrieval_scores(h_s, item_rows) / temp).log_softmax(-1)
        loss = loss + w_retrieval * F.kl_div(s, t, log_target=True, reduction="batchmean")
    if rank_rows is not None and w_rank:
        with torch.no_grad():
            r_t = model.ranking_scores(teacher, h_t, rank_rows)
        r_s = model.ranking_scores(student, h_s, rank_rows)
        loss = loss + w_rank * F.mse_loss(r_s, r_t)
    return loss
