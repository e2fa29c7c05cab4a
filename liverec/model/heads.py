"""Scoring heads: full-catalog retrieval and target-attention ranking.

Both split their work into an item side, which depends only on the item table and the model
version (serving computes it once per version and shares it across all requests), and a user
side, which depends on the user's encoded state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liverec.model.config import ModelConfig
from liverec.model.encoder import KVCache, rope, rope_tables


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
        """Score candidates `cand_rows [B, C, 2D]` (from `item_side`) for B users -> logits `[B, C]`.

        query_pos `[B]`: where the candidates sit (the user's next position); k/v
        `[B, H, S, D/H]`: the last layer's K/V; key_mask `[B, S]`: slots that may be attended;
        user_hidden `[B, D]`: the query token's hidden state.
        """
        emb, q = cand_rows.split(self.dim, dim=-1)
        attended = self.attend(q[:, None], query_pos[:, None], k, v, key_mask[:, None])[:, 0]
        return self.mlp_logits(emb, attended, user_hidden)

    def attend(self, q: Tensor, query_pos: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
        """Candidates' (unrotated) queries `q [B, Q, C, D]` at Q query positions per user
        `query_pos [B, Q]`, each seeing `key_mask [B, Q, S]` of the user's K/V -> the heads'
        outputs `[B, Q, C, D]`, before the output projection (`mlp_logits` applies it).

        Training puts the Q targets of a row here, so they share the row's K/V instead of each
        gathering a copy, and projects only the (row, slot) pairs that hold a target. The sink
        is one more key/value, always visible, so a single fused attention call covers it.
        """
        b, nq, c, _ = q.shape
        heads, s = self.heads, k.shape[2]
        cos, sin = rope_tables(query_pos, self.dim // heads, self.rope_base, q.dtype)
        q = rope(q.unflatten(-1, (heads, self.dim // heads)), cos[:, :, None, None], sin[:, :, None, None])
        q = q.permute(0, 3, 1, 2, 4).flatten(2, 3)  # [B, H, Q*C, D/H]
        keys = torch.cat((self.sink_k.to(q.dtype)[None, :, None].expand(b, -1, -1, -1), k.to(q.dtype)), 2)
        values = torch.cat((self.sink_v.to(q.dtype)[None, :, None].expand(b, -1, -1, -1), v.to(q.dtype)), 2)
        mask = torch.cat((key_mask.new_ones(b, nq, 1), key_mask.bool()), 2)
        mask = mask[:, None, :, None].expand(b, 1, nq, c, s + 1).reshape(b, 1, nq * c, s + 1)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return a.unflatten(2, (nq, c)).permute(0, 2, 3, 1, 4).flatten(-2)

    def mlp_logits(self, emb: Tensor, attended: Tensor, user_hidden: Tensor) -> Tensor:
        """The MLP over [candidate, attended, candidate * attended, user]: `emb`, `attended`
        `[..., C, D]` (from `attend`), `user_hidden [..., D]` -> logits `[..., C]`.

        The first layer is split so the user's part is computed once per user, not once per
        candidate (the same sum, without materialising the user copies).
        """
        attended = self.out(attended)
        first, act, last = self.mlp
        w_cand, w_user = first.weight.split((3 * self.dim, self.dim), dim=1)
        h = F.linear(torch.cat((emb, attended, emb * attended), dim=-1), w_cand)
        h = h + F.linear(user_hidden, w_user, first.bias)[..., None, :]
        return last(act(h)).squeeze(-1)

    def score(self, cache: KVCache, user_hidden: Tensor, cand_rows: Tensor) -> Tensor:
        """Serving form: candidates `[B, C, 2D]` against each user's cache -> logits `[B, C]`."""
        k, v = cache.layers[-1]
        return self(cand_rows, cache.next_pos, k, v, cache.valid, user_hidden)
