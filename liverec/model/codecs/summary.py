"""`summary`: S learned query tokens pool the whole history into S slots of per-layer K/V (VISTA).

Per layer `l`, head `h` and summary token `s`, a learned query `u[l, s, h]`, rotated to the
user's next position (so it can prefer recent events, as the query token does), attends over
the user's cached keys of that layer; the token's key and value are the attention-weighted
means of the history's keys and values, plus a learned key offset (also rotated to the next
position), which lets a token set how much attention it draws from the query token, e.g. in
proportion to how many events it stands for. The query token and the ranking head's
candidates then attend to the S tokens instead of the history.

Stored: S rows in the `full` payload layout (zero rows for a user without events), so bytes do
not depend on the history length. Decoded: a cache of S valid slots per user whose keys are
mixtures of rotated keys (no single position), with the user's true `next_pos`.

Not incremental: the queries sit at the next position, which moves with every event and
changes every pooling weight; the trainer re-encodes from the user's cache. The tokens are
trained by distillation (`auxiliary_loss`), online with the model or after it (`fit_codec`).
Decoding reads no parameters (the payload holds plain K/V rows), so a summary state decodes
whatever parameter version encoded it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from liverec.model.codecs.base import HEAD, Cost
from liverec.model.codecs.dense import FullCodec
from liverec.model.codecs.distill import distillation_loss
from liverec.model.config import EncoderConfig
from liverec.model.encoder import KVCache, rope, rope_tables

if TYPE_CHECKING:
    from liverec.model.recommender import SequentialRecommender


class SummaryTokens(nn.Module):
    """The learned part of `summary`: per layer, S query tokens and S key offsets."""

    def __init__(self, encoder: EncoderConfig, tokens: int) -> None:
        super().__init__()
        self.encoder, self.tokens = encoder, tokens
        shape = (encoder.layers, tokens, encoder.heads, encoder.head_dim)
        self.queries = nn.Parameter(torch.randn(shape))
        self.key_offset = nn.Parameter(torch.zeros(shape))

    def forward(self, cache: KVCache) -> KVCache:
        """The summary cache `[B, H, S, D/H]` per layer (differentiable in the tokens and the cache)."""
        e = self.encoder
        valid = cache.valid
        b = valid.shape[0]
        dtype = cache.layers[0][0].dtype
        cos, sin = rope_tables(cache.next_pos, e.head_dim, e.rope_base, dtype)
        cos, sin = cos[:, None, None], sin[:, None, None]  # [B, 1, 1, Dh] over heads and tokens
        has = valid.any(1)
        layers = []
        for i, (k, v) in enumerate(cache.layers):
            u = rope(self.queries[i].transpose(0, 1).to(dtype)[None], cos, sin)  # [B, H, S, Dh]
            logits = u @ k.transpose(-1, -2) / math.sqrt(e.head_dim)  # [B, H, S, N]
            logits = logits.masked_fill(~valid[:, None, None, :], -math.inf)
            weights = torch.where(has[:, None, None, None], logits.softmax(-1), torch.zeros_like(logits))
            offset = rope(self.key_offset[i].transpose(0, 1).to(dtype)[None], cos, sin)
            layers.append((weights @ k + offset, weights @ v))
        out_valid = has[:, None].expand(b, self.tokens)
        return KVCache(layers, out_valid, cache.next_pos)


class SummaryCodec(FullCodec):
    codec_id = "summary"
    incremental = False
    fit_lr = 1e-2

    def __init__(self, encoder: EncoderConfig, tokens: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(encoder, dtype)
        self.tokens = tokens
        self.summary = SummaryTokens(encoder, tokens)

    @property
    def module(self) -> nn.Module:
        return self.summary

    def encode(self, cache: KVCache, model: SequentialRecommender | None = None) -> list[bytes]:
        with torch.no_grad():
            return super().encode(self.summary(cache))

    def append(self, payloads: Sequence[bytes], new: KVCache) -> list[bytes]:
        raise NotImplementedError("summary is not incremental: every pooling weight moves with the next position")

    def auxiliary_loss(
        self,
        model: SequentialRecommender,
        cache: KVCache,
        item_rows: Tensor | None = None,
        rank_rows: Tensor | None = None,
    ) -> Tensor:
        """Distillation of the full cache into the summary (see `distill.distillation_loss`)."""
        return distillation_loss(model, cache, self.summary(cache), item_rows, rank_rows)

    def bytes_per_user(self, history_len: int) -> int:
        return HEAD.size + 1 + (self.tokens if history_len > 0 else 0) * self.row_bytes

    @property
    def cost(self) -> Cost:
        return Cost(
            refresh="recompute: S learned queries attend over the full cache, per layer and head",
            serve=f"copy {self.tokens} rows; attention over them (constant in history)",
        )
