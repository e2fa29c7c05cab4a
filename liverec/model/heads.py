"""Scoring heads: full-catalog retrieval and target-attention ranking.

Both split their work into an item side, which depends only on the item table and the model
version (serving computes it once per version and shares it across all requests), and a user
side, which depends on the user's encoded state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liverec.model.config import ModelConfig
from liverec.model.encoder import KVCache, rope


class RetrievalHead(nn.Module):
    """Cosine retrieval: user vector = normalise(W h_query), item vector = normalise(e_item).

    Normalising both sides keeps the logits in [-1, 1] / temperature whatever scale the embedding
    store initialises rows at, and an unadmitted item (a zero row) scores exactly 0.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def user_side(self, user_hidden: Tensor) -> Tensor:
        """`[..., D]` query hidden state -> `[..., D]` unit user vector."""
        return F.normalize(self.proj(user_hidden), dim=-1)

    @staticmethod
    def item_side(item_emb: Tensor) -> Tensor:
        """`[..., D]` item embeddings -> `[..., D]` unit item vectors (precompute per version)."""
        return F.normalize(item_emb, dim=-1)

    @staticmethod
    def score_all(user_vec: Tensor, item_rows: Tensor) -> Tensor:
        """`user_vec [B, D]` against `item_rows [N, D]` (from `item_side`) -> scores `[B, N]`."""
        return user_vec @ item_rows.to(user_vec.dtype).T


class TargetAttentionHead(nn.Module):
    """VISTA's second stage: each candidate attends over the user's K/V, then an MLP scores it.

    A candidate's query is a projection of its embedding (item side), rotated to the position of
    the user's next event, so it sees the history at the same relative offsets as the retrieval
    query token. It attends over the *last layer's* K/V, per head, plus a learned sink key/value
    that makes the attention well-defined for a user with no events. The MLP scores
    [candidate, attended, candidate * attended, user hidden] -> one logit per candidate.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        enc = config.encoder
        self.dim, self.heads, self.rope_base = enc.dim, enc.heads, enc.rope_base
        self.q_proj = nn.Linear(enc.dim, enc.dim, bias=False)
        self.sink_k = nn.Parameter(torch.zeros(enc.heads, enc.head_dim))
        self.sink_v = nn.Parameter(torch.zeros(enc.heads, enc.head_dim))
        self.out = nn.Linear(enc.dim, enc.dim)
        self.mlp = nn.Sequential(
            nn.Linear(4 * enc.dim, config.rank_mlp_hidden), nn.GELU(), nn.Linear(config.rank_mlp_hidden, 1)
        )

    def item_side(self, item_emb: Tensor) -> Tensor:
        """`[..., D]` item embeddings -> `[..., 2D]` rows: the embedding and its (unrotated)
        attention query. Precompute once per model version; gather candidates' rows by id."""
        return torch.cat((item_emb, self.q_proj(item_emb)), dim=-1)

    def forward(
        self,
        cand_rows: Tensor,
        query_pos: Tensor,
        k: Tensor,
        v: Tensor,
        key_mask: Tensor,
        user_hidden: Tensor,
    ) -> Tensor:
        """Score candidates `cand_rows [B, C, 2D]` (from `item_side`) for B users (or, in
        training, B targets) -> logits `[B, C]`.

        query_pos `[B]`: where the candidates sit (the user's next position); k/v
        `[B, H, S, D/H]`: the last layer's K/V; key_mask `[B, S]`: slots that may be attended;
        user_hidden `[B, D]`: the query token's hidden state.
        """
        emb, q = cand_rows.split(self.dim, dim=-1)
        q = rope(q.unflatten(-1, (self.heads, -1)), query_pos[:, None, None], self.rope_base)
        k, v = k.to(q.dtype), v.to(q.dtype)
        scale = 1.0 / math.sqrt(q.shape[-1])
        logits = torch.einsum("bchd,bhsd->bchs", q, k) * scale
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        sink = torch.einsum("bchd,hd->bch", q, self.sink_k.to(q.dtype))[..., None] * scale
        weights = torch.softmax(torch.cat((sink, logits), dim=-1), dim=-1)
        attended = torch.einsum("bchs,bhsd->bchd", weights[..., 1:], v) + weights[..., :1] * self.sink_v.to(q.dtype)
        attended = self.out(attended.flatten(-2))
        user = user_hidden[:, None].expand_as(emb)
        return self.mlp(torch.cat((emb, attended, emb * attended, user), dim=-1)).squeeze(-1)

    def score(self, cache: KVCache, user_hidden: Tensor, cand_rows: Tensor) -> Tensor:
        """Serving form: candidates `[B, C, 2D]` against each user's cache -> logits `[B, C]`."""
        k, v = cache.layers[-1]
        return self(cand_rows, cache.next_pos, k, v, cache.valid, user_hidden)
