"""Causal transformer over a user's event history, with a K/V cache that extends incrementally.

Inputs. The caller looks item embeddings up (in the embedding store when training, in a device
table when serving) and passes them as tensors `[B, T, D]`; the encoder owns a small dense
`nn.Embedding` for the action type (a handful of ids, trained with the dense weights), which is
added to the item embedding. So the encoder runs with plain torch wherever there is a table.

Padding. Every call takes a `valid` mask `[B, T]` (True = a real event). Padding may sit
anywhere: left-padded batches, right-padded batches and holes left by chunked extension all give
the same results, because nothing depends on the slot index except causal order. Padding slots
may hold any finite values; their hidden states are meaningless (but finite) and no valid slot
ever attends to them.

Positions. An event's position is its absolute index in the user's history (`start_pos` plus the
number of valid events before it). Rotary embeddings (RoPE) rotate queries and keys by their
positions, so attention logits depend only on relative offsets; keys are cached already rotated.
Hence cached K/V of old events stay valid when events are appended (`extend` equals a full
recompute up to float rounding, whatever the chunking), and shifting every position by a
constant changes nothing. Angles are computed in float64 so positions of long-lived users (in
the millions) keep full precision.

Sliding window. A cache holds at most `capacity` slots (default `max_len`, the training window):
`extend` keeps each user's most recent `capacity` events. The kept K/V were computed when their
events still saw the now-evicted older events, so a windowed cache is a streaming approximation
of encoding the whole history (StreamingLLM-style), not equal to re-encoding only the last
`capacity` events; offsets between a query and any cached key stay below the trained window.

Query stream. The user vector comes from a query token: a learned embedding placed at the
position of the user's *next* event, which runs through the same layers attending over the
history's per-layer K/V (and itself) but contributes no K/V. So the user vector is a function of
the stored K/V alone, which is what a state codec stores and decodes (`query`). In training a
query token follows each history slot that has a target (slot t predicts event t+1), in the
same pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liverec.model.config import EncoderConfig


def rope_tables(pos: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`(cos, signed sin)`, each `[*pos.shape, head_dim]`, that `rope` rotates by.

    Computed once per forward and shared by every layer and by queries and keys alike. Angles
    are formed in float64 so positions of long-lived users (in the millions) keep full
    precision; only the cos/sin are rounded to `dtype`.
    """
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, device=pos.device, dtype=torch.float64) / half)
    angle = pos.to(torch.float64)[..., None] * inv_freq
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + d/2) of `x [..., d]` by the angles of `rope_tables`.

    Rotating a query at p and a key at s makes their dot product depend on s - p only, which is
    what lets cached keys outlive new positions. `roll` swaps the halves, and the signed sin
    turns (x1, x2) into (x1 cos - x2 sin, x2 cos + x1 sin).
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def event_positions(valid: Tensor, start: Tensor) -> Tensor:
    """Absolute position of each slot `[B, T]`: `start [B]` plus the valid events before it.

    A padding slot gets the position of the next valid event; it is masked, so it never matters.
    """
    v = valid.long()
    return start[:, None] + v.cumsum(1) - v


def _eye(batch: int, n: int, device: torch.device) -> Tensor:
    return torch.eye(n, dtype=torch.bool, device=device).expand(batch, n, n)


@dataclass(frozen=True)
class KVCache:
    """A batch of users' encoded histories: what the state codecs store and what the heads read.

    layers:   per layer `(K, V)`, each `[B, H, S, D/H]`; K is already rotated to its event's position.
    valid:    `[B, S]` bool, which slots hold an event.
    next_pos: `[B]` long, the absolute position of each user's next event (= events seen so far);
              the query token sits there.
    """

    layers: list[tuple[Tensor, Tensor]]
    valid: Tensor
    next_pos: Tensor

    @classmethod
    def empty(
        cls,
        config: EncoderConfig,
        batch: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        next_pos: Tensor | None = None,
    ) -> KVCache:
        """A cache with no events; `next_pos` (default 0) is where the first event will go."""
        shape = (batch, config.heads, 0, config.head_dim)
        layers = [
            (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(config.layers)
        ]
        if next_pos is None:
            next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(layers, torch.zeros(batch, 0, dtype=torch.bool, device=device), next_pos)

    @property
    def lengths(self) -> Tensor:
        """Events held per user `[B]`."""
        return self.valid.sum(1)

    def compact(self, capacity: int) -> KVCache:
        """Keep each user's most recent `capacity` events, left-padded, without holes.

        The width becomes the largest kept count, so a cache of short histories stays small.
        """
        if capacity <= 0:
            raise ValueError(f"capacity: must be > 0, got {capacity}")
        valid = self.valid
        from_end = valid.long().flip(1).cumsum(1).flip(1)  # valid slots at or after each slot
        keep = valid & (from_end <= capacity)
        width = int(keep.sum(1).max()) if valid.numel() else 0
        # Kept slot -> width - from_end (left-padded, order preserved); dropped slot -> dump slot `width`.
        dest = torch.where(keep, width - from_end, torch.full_like(from_end, width))
        new_valid = torch.zeros(valid.shape[0], width + 1, dtype=torch.bool, device=valid.device)
        new_valid.scatter_(1, dest, keep)

        def move(t: Tensor) -> Tensor:
            out = t.new_zeros(t.shape[0], t.shape[1], width + 1, t.shape[3])
            index = dest[:, None, :, None].expand_as(t)
            return out.scatter_(2, index, t)[:, :, :width]

        layers = [(move(k), move(v)) for k, v in self.layers]
        return KVCache(layers, new_valid[:, :width], self.next_pos)


@dataclass(frozen=True)
class EncoderOutput:
    """hidden:       `[B, L, D]` final hidden state of each history slot, or None when not asked for.
    query_hidden: `[B, Q, D]` hidden state of the query token after each requested slot (the
                  user state that predicts the next event), or None when no queries were asked.
    query_pos:    `[B, Q]` position of each of those query tokens, or None.
    kv:           the history's K/V, one slot per input slot (not compacted).
    """

    hidden: Tensor | None
    query_hidden: Tensor | None
    query_pos: Tensor | None
    kv: KVCache


class Block(nn.Module):
    """Pre-norm transformer block whose attention also reads K/V cached from earlier calls."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        d = config.dim
        self.heads, self.head_dim, self.dropout = config.heads, config.head_dim, config.dropout
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, config.ffn_mult * d), nn.GELU(), nn.Linear(config.ffn_mult * d, d))
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor, past_v: Tensor, mask: Tensor, first: int = 0,
        queries_out: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x `[B, N, D]` with rotation tables `[B, N, 1, 1, D/H]`; mask `[B, 1, N, P + N]` over
        past + own keys. Returns the new x of tokens `first:` only, and the (rotated) K and V of
        all N tokens, `[B, H, N, D/H]`. With `queries_out`, appends the rotated queries of tokens
        `first:`, `[B, H, N - first, D/H]` (what `SequenceEncoder.query` returns on request).

        The last layer passes `first = T` when no one reads the events' hidden states (training
        and scoring read only the query tokens and the K/V): the events then only project K/V.
        """
        b, n, _ = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, self.head_dim)
        q, k = rope(qkv[:, :, :2], cos, sin).permute(2, 0, 3, 1, 4)  # one rotation for q and k
        v = qkv[:, :, 2].transpose(1, 2)
        keys = torch.cat((past_k.to(k.dtype), k), dim=2) if past_k.shape[2] else k
        values = torch.cat((past_v.to(v.dtype), v), dim=2) if past_v.shape[2] else v
        drop = self.dropout if self.training else 0.0
        q, mask = q[:, :, first:], mask[:, :, first:]
        if queries_out is not None:
            queries_out.append(q)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=drop)
        x = x[:, first:] + self.drop(self.proj(a.transpose(1, 2).flatten(2)))
        x = x + self.drop(self.ffn(self.norm2(x)))
        return x, k, v


class SequenceEncoder(nn.Module):
    """Causal pre-norm transformer (SASRec/HSTU style) with RoPE and an incremental K/V cache."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.action_emb = nn.Embedding(config.num_actions, config.dim)
        self.query_token = nn.Parameter(torch.randn(config.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.drop = nn.Dropout(config.dropout)
        nn.init.normal_(self.action_emb.weight, std=0.02)

    def forward(
        self,
        item_emb: Tensor,
        actions: Tensor,
        valid: Tensor | None = None,
        start_pos: Tensor | None = None,
        queries: bool | Tensor = True,
        hidden: bool = True,
    ) -> EncoderOutput:
        """Encode histories `item_emb [B, L, D]`, `actions [B, L]` from scratch.

        `start_pos [B]` (default 0) is the absolute position of each row's first valid event.
        `queries` places query tokens for next-event prediction: True after every slot
        (Q = L), a long tensor of ascending slot indices after those slots only (online
        training, where only the newest events are targets), False nowhere (just K/V).
        `hidden=False` skips the events' final hidden states (`hidden` is then None), which
        saves most of the last layer when only the queries and the K/V are read.
        """
        b, length, _ = item_emb.shape
        cache = KVCache.empty(self.config, b, item_emb.device, item_emb.dtype, start_pos)
        if isinstance(queries, Tensor):
            anchors: Tensor | None = queries.to(item_emb.device)
        else:
            anchors = torch.arange(length, device=item_emb.device) if queries else None
        events, query_hidden, kv, valid = self._run(cache, item_emb, actions, valid, anchors, hidden)
        if anchors is None:
            return EncoderOutput(events, None, None, kv)
        query_pos = (event_positions(valid, cache.next_pos) + valid.long())[:, anchors]
        return EncoderOutput(events, query_hidden, query_pos, kv)

    def extend(
        self,
        cache: KVCache,
        item_emb: Tensor,
        actions: Tensor,
        valid: Tensor | None = None,
        capacity: int | None = None,
    ) -> tuple[Tensor, KVCache]:
        """Append events `[B, T]` to `cache` without recomputing the cached ones.

        Only the new events run through the layers (attending to the cached K/V and each other).
        Returns their hidden states `[B, T, D]` and the extended cache, compacted to each user's
        last `capacity` events (default `max_len`).
        """
        hidden, _, kv, _ = self._run(cache, item_emb, actions, valid, None, True)
        assert hidden is not None
        return hidden, kv.compact(self.config.max_len if capacity is None else capacity)

    @overload
    def query(self, cache: KVCache, return_queries: Literal[False] = False) -> Tensor: ...

    @overload
    def query(self, cache: KVCache, return_queries: Literal[True]) -> tuple[Tensor, list[Tensor]]: ...

    def query(self, cache: KVCache, return_queries: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Hidden state `[B, D]` of a query token at `next_pos` attending over `cache` (any K/V:
        encoded, extended, or decoded by a state codec). A user with no events gets a valid
        (history-free) answer, since the query token also attends to itself.

        `return_queries`: also the token's rotated attention query of every layer, `[B, H, D/H]`
        each, which the `pages` codec ranks pages with (what the token looks for in the cache)."""
        b = cache.valid.shape[0]
        empty = self.query_token.new_zeros(b, 0, self.config.dim)
        actions = torch.zeros(b, 0, dtype=torch.long, device=empty.device)
        anchors = torch.full((1,), -1, dtype=torch.long, device=empty.device)
        queries: list[Tensor] | None = [] if return_queries else None
        _, query_hidden, _, _ = self._run(cache, empty, actions, None, anchors, False, queries)
        assert query_hidden is not None
        if queries is None:
            return query_hidden[:, 0]
        return query_hidden[:, 0], [q[:, :, 0] for q in queries]

    def _run(
        self,
        cache: KVCache,
        item_emb: Tensor,
        actions: Tensor,
        valid: Tensor | None,
        anchors: Tensor | None,
        hidden: bool,
        queries_out: list[Tensor] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, KVCache, Tensor]:
        """Run T new events (and Q query tokens) through every layer on top of `cache`.

        Query token q follows new event `anchors[q]` (-1: only the cache): it sees the cache, the
        valid new events up to its anchor, and itself. Returns (event hidden `[B, T, D]` if
        `hidden` else None, query hidden `[B, Q, D]` or None, extended cache, the valid mask used).
        """
        b, t, d = item_emb.shape
        if d != self.config.dim:
            raise ValueError(f"item_emb: last dim must be encoder.dim={self.config.dim}, got {d}")
        if actions.shape != (b, t):
            raise ValueError(f"actions: expected shape {(b, t)}, got {tuple(actions.shape)}")
        device = item_emb.device
        if valid is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=device)
        valid = valid.bool()
        pos = event_positions(valid, cache.next_pos)
        x = self.drop(item_emb + self.action_emb(actions))
        mask = self._mask(cache.valid, valid, anchors)
        if anchors is not None:
            seen = torch.cat((torch.zeros(b, 1, dtype=torch.long, device=device), valid.long().cumsum(1)), 1)
            pos = torch.cat((pos, cache.next_pos[:, None] + seen[:, anchors + 1]), 1)
            x = torch.cat((x, self.query_token.to(x.dtype).expand(b, anchors.numel(), d)), 1)
        cos, sin = rope_tables(pos, self.config.head_dim, self.config.rope_base, x.dtype)
        cos, sin = cos[:, :, None, None], sin[:, :, None, None]
        layers = []
        last = len(self.blocks) - 1
        for i, (block, (past_k, past_v)) in enumerate(zip(self.blocks, cache.layers, strict=True)):
            x, k, v = block(x, cos, sin, past_k, past_v, mask, 0 if hidden or i < last else t, queries_out)
            new_k, new_v = k[:, :, :t], v[:, :, :t]
            if past_k.shape[2]:
                new_k, new_v = torch.cat((past_k.to(k.dtype), new_k), 2), torch.cat((past_v.to(v.dtype), new_v), 2)
            layers.append((new_k, new_v))
        x = self.norm(x)  # events then queries if `hidden`, else queries only
        events, query_hidden = (x[:, :t], x[:, t:]) if hidden else (None, x)
        kv = KVCache(layers, torch.cat((cache.valid, valid), 1), cache.next_pos + valid.long().sum(1))
        return events, query_hidden if anchors is not None else None, kv, valid

    @staticmethod
    def _mask(past_valid: Tensor, valid: Tensor, anchors: Tensor | None) -> Tensor:
        """Boolean attention mask `[B, 1, T + Q, P + T + Q]` (True = may attend).

        Every token may attend to itself, so no row is empty (padding slots included) and the
        softmax never sees a row of -inf.
        """
        b, t = valid.shape
        device = valid.device
        idx = torch.arange(t, device=device)
        q = 0 if anchors is None else anchors.numel()
        past = past_valid[:, None, :].expand(b, t + q, past_valid.shape[1])
        events = torch.cat(
            (
                past[:, :t],
                ((idx[None, :] <= idx[:, None]) & valid[:, None, :]) | _eye(b, t, device),
                torch.zeros(b, t, q, dtype=torch.bool, device=device),
            ),
            2,
        )
        if anchors is None:
            return events[:, None]
        upto_anchor = (idx[None, :] <= anchors[:, None]) & valid[:, None, :]
        queries = torch.cat((past[:, t:], upto_anchor, _eye(b, q, device)), 2)
        return torch.cat((events, queries), 1)[:, None]
