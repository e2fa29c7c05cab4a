"""The whole model: encoder + retrieval head + target-attention head, and its training loss.

The trainer's step stays three lines: look up the embeddings of a `TrainBatch` in the store
(with autograd), `losses = model(batch)`, `losses.total.backward()` then step dense Adam and
the store's sparse optimizer. Serving uses the inference methods with a device item table and
never touches the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from liverec.model.config import ModelConfig
from liverec.model.encoder import KVCache, SequenceEncoder
from liverec.model.heads import RetrievalHead, TargetAttentionHead
from liverec.model.losses import bce_ranking_loss, sampled_softmax_loss


@dataclass(frozen=True)
class TrainBatch:
    """A batch of event windows, one row per user, in time order (padding anywhere, see `valid`).

    Slot t of the history (events 0..L-1) predicts event t+1, so events carry L+1 slots.

    item_emb  `[B, L+1, D]` the events' item embeddings, looked up by the caller.
    item_ids  `[B, L+1]` long, item ids (accidental-hit masking).
    actions   `[B, L+1]` long, action ids (< encoder.num_actions; anything valid in padding).
    valid     `[B, L+1]` bool, real events.
    log_q     `[B, L+1]` log frequency of each event's item, e.g. log(count / total) from the store.
    neg_emb   `[N, D]`, neg_ids `[N]`, log_q_neg `[N]`: uniform negatives and their log probability.
    loss_mask `[B, L]` bool, which targets (events 1..L) count; default: every valid event that
              has a valid event right before it. Online training sets it to the new events only.
    start_pos `[B]` long, absolute position of each row's first valid event (default 0).
    full_catalog: the negatives are every item of the catalog (with log_q_neg = -log(catalog)):
              the softmax is then exact, so in-batch negatives are not added whatever the config.
    """

    item_emb: Tensor
    item_ids: Tensor
    actions: Tensor
    valid: Tensor
    log_q: Tensor
    neg_emb: Tensor
    neg_ids: Tensor
    log_q_neg: Tensor
    loss_mask: Tensor | None = None
    start_pos: Tensor | None = None
    full_catalog: bool = False


class Losses(NamedTuple):
    total: Tensor
    retrieval: Tensor
    ranking: Tensor


class ItemSide(NamedTuple):
    """Per-model-version item tensors: `retrieval [N, D]`, `ranking [N, 2D]` (gather by id)."""

    retrieval: Tensor
    ranking: Tensor


class SequentialRecommender(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = SequenceEncoder(config.encoder)
        self.retrieval = RetrievalHead(config.encoder.dim)
        self.ranker = TargetAttentionHead(config)

    def forward(self, batch: TrainBatch) -> Losses:
        """Losses of next-event prediction at every target selected by `loss_mask`."""
        cfg = self.config
        valid = batch.valid.bool()
        hist_valid, target_valid = valid[:, :-1], valid[:, 1:]
        mask = batch.loss_mask.bool() & target_valid if batch.loss_mask is not None else target_valid & hist_valid
        # Query tokens only after slots where some row has a target; `mask[:, slots][picked]`
        # lists targets in the same (row, slot) order as `mask`'s own True entries.
        slots = mask.any(0).nonzero().squeeze(1)
        picked = mask[:, slots]
        out = self.encoder(
            batch.item_emb[:, :-1], batch.actions[:, :-1], hist_valid, batch.start_pos, slots, hidden=False
        )
        assert out.query_hidden is not None and out.query_pos is not None
        user_hidden = out.query_hidden[picked]

        targets = batch.item_emb[:, 1:][mask]
        pos_ids = batch.item_ids[:, 1:][mask]
        retrieval = sampled_softmax_loss(
            self.retrieval.user_side(user_hidden),
            self.retrieval.item_side(targets),
            pos_ids,
            self.retrieval.item_side(batch.neg_emb),
            batch.neg_ids,
            batch.log_q[:, 1:][mask],
            batch.log_q_neg,
            in_batch=cfg.in_batch_negatives and not batch.full_catalog,
            temperature=cfg.temperature,
        )

        # Ranking: each target against the first K uniform negatives, the candidates attending
        # over the history up to the target's slot. Attention runs per (row, query slot), so
        # targets share their row's K/V; the MLP runs on the picked targets only.
        num_neg = min(cfg.rank_negatives, batch.neg_emb.shape[0])
        neg_emb = batch.neg_emb[:num_neg]
        slot_q = self.ranker.q_proj(batch.item_emb[:, 1:][:, slots])  # [B, Q, D], targets where picked
        rows, q = slot_q.shape[:2]
        cand_q = torch.cat((slot_q[:, :, None], self.ranker.q_proj(neg_emb).expand(rows, q, -1, -1)), 2)
        history = torch.arange(hist_valid.shape[1], device=valid.device)
        key_mask = hist_valid[:, None, :] & (history[None, None, :] <= slots[None, :, None])
        keys, values = out.kv.layers[-1]
        attended = self.ranker.attend(cand_q, out.query_pos, keys, values, key_mask)[picked]
        cand_emb = torch.cat((targets[:, None], neg_emb.expand(len(targets), -1, -1)), 1)
        logits = self.ranker.mlp_logits(cand_emb, attended, user_hidden)
        ranking = bce_ranking_loss(logits[:, 0], logits[:, 1:], batch.neg_ids[None, :num_neg] != pos_ids[:, None])
        return Losses(retrieval + cfg.rank_weight * ranking, retrieval, ranking)

    def item_side(self, item_emb: Tensor) -> ItemSide:
        """Item tensors for scoring `item_emb [N, D]`; compute once per model version."""
        return ItemSide(self.retrieval.item_side(item_emb), self.ranker.item_side(item_emb))

    def encode(
        self, item_emb: Tensor, actions: Tensor, valid: Tensor | None = None, start_pos: Tensor | None = None
    ) -> KVCache:
        """Encode histories `[B, L]` into a cache (one slot per input slot)."""
        return self.encoder(item_emb, actions, valid, start_pos, queries=False, hidden=False).kv

    def user_hidden(self, cache: KVCache) -> Tensor:
        """Query-token hidden state `[B, D]` over the cache; feeds both heads."""
        return self.encoder.query(cache)

    def retrieval_scores(self, user_hidden: Tensor, item_rows: Tensor) -> Tensor:
        """`[B, D]` user hidden against `ItemSide.retrieval [N, D]` -> `[B, N]`."""
        return self.retrieval.score_all(self.retrieval.user_side(user_hidden), item_rows)

    def ranking_scores(self, cache: KVCache, user_hidden: Tensor, cand_rows: Tensor) -> Tensor:
        """Candidates' `ItemSide.ranking` rows `[B, C, 2D]` -> logits `[B, C]`."""
        return self.ranker.score(cache, user_hidden, cand_rows)
