"""`pages`: a constant number of K/V pages chosen by query-centric similarity (LServe / Quest).

A user's history is cut into pages of `page_size` events, counted back from the newest (so only
the oldest page can be partial). Each page's keys are summarised per (layer, head) by their
channel-wise min and max; the query token's query `q` at that layer bounds the page's best
attention logit from above by `sum_c max(q_c * min_c, q_c * max_c)` without touching its keys.
Per (layer, head) the bounds become a softmax over pages (an estimate of the attention mass
each page can take), summed over layers and heads into one score per page; the `recent_pages`
newest pages are always kept (recency dominates next-item prediction), the best-scoring others
fill the `pages` budget. One selection serves every layer and head, so the kept slots share a
valid mask.

Stored: the kept slots' K/V, oldest first, in the `full` payload layout; at most
`pages * page_size` slots whatever the history length. Decoded: a cache whose slots are the
kept events (their keys carry their positions; positions have gaps where pages were dropped)
and whose `next_pos` is the user's true next position. A history of at most
`pages * page_size` events keeps every slot, so it decodes exactly (in fp32); a longer one keeps
exactly `pages * page_size` (the partial oldest page is never a candidate), so the bytes are
`bytes_per_user(n)` exactly.

Not incremental: a new event moves the query, which can change the selection; the trainer
re-encodes from the user's full cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from liverec.model.codecs.base import Cost
from liverec.model.codecs.dense import FullCodec
from liverec.model.config import EncoderConfig
from liverec.model.encoder import KVCache

if TYPE_CHECKING:
    from liverec.model.recommender import SequentialRecommender


class PagesCodec(FullCodec):
    codec_id = "pages"
    incremental = False

    def __init__(
        self,
        encoder: EncoderConfig,
        page_size: int,
        pages: int,
        recent_pages: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(encoder, dtype)
        self.page_size, self.pages, self.recent_pages = page_size, pages, recent_pages

    def select(self, model: SequentialRecommender, cache: KVCache) -> Tensor:
        """`[B, S]` bool: the slots of the selected pages."""
        valid = cache.valid
        after = valid.long().flip(1).cumsum(1).flip(1)  # valid slots at or after each slot
        page = torch.where(valid, (after - 1) // self.page_size, torch.zeros_like(after))
        n_pages = int(page.max()) + 1 if valid.any() else 1
        if n_pages <= self.pages:
            return valid
        # Candidates: whole pages only, so a user past the budget keeps exactly pages * page_size
        # events (a partial oldest page only exists beyond the budget, where it is never needed).
        have = valid.sum(1)[:, None] // self.page_size > torch.arange(n_pages, device=valid.device)
        with torch.no_grad():
            _, queries = model.encoder.query(cache, return_queries=True)
            mass = torch.zeros(valid.shape[0], n_pages, device=valid.device)
            dump = torch.where(valid, page, torch.full_like(page, n_pages))  # padding -> extra page
            for (k, _v), q in zip(cache.layers, queries, strict=True):
                b, h, s, dh = k.shape
                index = dump[:, None, :, None].expand(b, h, s, dh)
                kmin = k.new_full((b, h, n_pages + 1, dh), math.inf).scatter_reduce(2, index, k, "amin")
                kmax = k.new_full((b, h, n_pages + 1, dh), -math.inf).scatter_reduce(2, index, k, "amax")
                qe = q[:, :, None, :]
                bound = torch.maximum(qe * kmin[:, :, :n_pages], qe * kmax[:, :, :n_pages]).sum(-1) / math.sqrt(dh)
                bound = bound.masked_fill(~have[:, None], -math.inf)
                mass += bound.float().softmax(-1).sum(1)
            mass = mass.masked_fill(torch.arange(n_pages, device=valid.device) < self.recent_pages, math.inf)
            mass = mass.masked_fill(~have, -math.inf)
            top = mass.topk(self.pages, dim=1).indices
            chosen = torch.zeros_like(have).scatter_(1, top, True) & have
        fits = (valid.sum(1) + self.page_size - 1) // self.page_size <= self.pages
        return valid & (fits[:, None] | chosen.gather(1, page))

    def encode(self, cache: KVCache, model: SequentialRecommender | None = None) -> list[bytes]:
        if model is None:
            raise ValueError("pages: encode needs the model (the query token selects the pages)")
        keep = self.select(model, cache)
        return super().encode(KVCache(cache.layers, keep, cache.next_pos))

    def append(self, payloads: Sequence[bytes], new: KVCache) -> list[bytes]:
        raise NotImplementedError("pages is not incremental: a new event can change which pages are kept")

    def bytes_per_user(self, history_len: int) -> int:
        return super().bytes_per_user(min(history_len, self.pages * self.page_size))

    @property
    def cost(self) -> Cost:
        return Cost(
            refresh="recompute: the query token over the full cache, page min/max bounds, top pages",
            serve=f"copy at most {self.pages * self.page_size} rows; attention over them (constant in history)",
        )
