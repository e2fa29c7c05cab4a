"""Scoring: a batch of Recommend queries against one immutable model snapshot, on one device.

The snapshot holds everything that does not depend on the user, computed once per parameter
version and shared by every request (RcLLM's reuse beyond the prefix): the model on the device,
the catalog's keys, and its item-side tensors for both heads (retrieval rows and target-attention
candidate rows), plus item popularity for cold-start answers. A new version builds a new snapshot
and replaces the reference in one assignment, so a batch scores entirely against one version.

User state comes from a `StateSource`: decoded compressed state records in a replica, or the
naive path that re-encodes the raw history on every request (the serving benchmark's baseline).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from liverec.model.encoder import KVCache
from liverec.model.recommender import SequentialRecommender
from liverec.serving.params import ParamsVersion

ITEM_TABLE = "item"


@dataclass(frozen=True)
class Query:
    user_id: int
    k: int
    candidates: np.ndarray | None = None  # int64 item ids: rank only these (target attention)
    exclude: np.ndarray | None = None  # int64 item ids never to return
    exclude_seen: bool = False


@dataclass(frozen=True)
class Answer:
    items: np.ndarray  # int64, best first
    scores: np.ndarray  # float32
    model_version: int
    state_version: int  # offset of the newest event the user's state includes; -1 for cold start
    staleness_ms: int  # now - event time of that newest event; 0 for cold start
    cold_start: bool


@dataclass(frozen=True)
class UserState:
    cache: KVCache  # one user, on the snapshot's device
    seen: np.ndarray  # int64 items of the history the state covers
    state_version: int
    last_event_time_ms: int


class StateSource(Protocol):
    def get(self, user_ids: list[int], snapshot: ModelSnapshot) -> list[UserState | None]: ...


@dataclass(frozen=True)
class ModelSnapshot:
    version: int
    event_time_ms: int
    model: SequentialRecommender
    item_keys: Tensor  # [N] sorted int64
    item_rows: Tensor  # [N, D] raw item embeddings (what encoders of histories read)
    retrieval_rows: Tensor  # [N, D] ItemSide.retrieval
    ranking_rows: Tensor  # [N, 2D] ItemSide.ranking
    popular: Tensor  # [N] indices into item_keys, most popular first
    device: torch.device

    @classmethod
    def build(cls, params: ParamsVersion, device: torch.device | str) -> ModelSnapshot:
        device = torch.device(device)
        model = SequentialRecommender(params.model_config)
        model.load_state_dict(params.dense_state)
        model.to(device).eval()
        keys, weights, counts = params.table(ITEM_TABLE)
        if not len(keys):
            weights = torch.zeros(0, params.model_config.encoder.dim)
        keys, weights = keys.to(device), weights.to(device)
        with torch.no_grad():
            side = model.item_side(weights)
        popular = torch.argsort(counts.to(device), descending=True, stable=True)
        return cls(params.version, params.event_time_ms, model, keys, weights, side.retrieval, side.ranking,
                   popular, device)

    def columns(self, items: np.ndarray) -> tuple[Tensor, Tensor]:
        """Catalog column of each item id, and whether it is in the catalog."""
        ids = torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64)).to(self.device)
        if not len(self.item_keys):
            return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
        pos = torch.searchsorted(self.item_keys, ids).clamp(max=len(self.item_keys) - 1)
        return pos, self.item_keys[pos] == ids


def stack_caches(caches: list[KVCache]) -> KVCache:
    """One batch from single-user caches of different lengths (left-padded)."""
    width = max(int(c.valid.shape[1]) for c in caches)

    def pad(t: Tensor, n: int) -> Tensor:
        return torch.nn.functional.pad(t, (0, 0, width - n, 0)) if n < width else t

    layers = []
    for layer in range(len(caches[0].layers)):
        ks = [pad(c.layers[layer][0], c.valid.shape[1]) for c in caches]
        vs = [pad(c.layers[layer][1], c.valid.shape[1]) for c in caches]
        layers.append((torch.cat(ks), torch.cat(vs)))
    valid = torch.cat([torch.nn.functional.pad(c.valid, (width - c.valid.shape[1], 0)) for c in caches])
    return KVCache(layers, valid, torch.cat([c.next_pos for c in caches]))


class Scorer:
    """Answers a batch of queries with one forward pass for all warm users."""

    def __init__(self, states: StateSource) -> None:
        self.states = states

    @torch.no_grad()
    def recommend(self, snapshot: ModelSnapshot, queries: list[Query]) -> list[Answer]:
        states = self.states.get([q.user_id for q in queries], snapshot)
        now_ms = int(time.time() * 1000)
        warm = [i for i, s in enumerate(states) if s is not None]
        answers: list[Answer | None] = [None] * len(queries)
        if warm:
            cache = stack_caches([states[i].cache for i in warm])  # type: ignore[union-attr]
            hidden = snapshot.model.user_hidden(cache)
            full = [j for j, i in enumerate(warm) if queries[i].candidates is None]
            scores_full = snapshot.model.retrieval_scores(hidden[full], snapshot.retrieval_rows) if full else None
            for row, j in enumerate(full):
                i = warm[j]
                answers[i] = self._top_k(snapshot, queries[i], states[i], scores_full[row], now_ms)
            for j, i in enumerate(warm):
                if queries[i].candidates is not None:
                    answers[i] = self._rank_candidates(snapshot, queries[i], states[i], cache, hidden, j, now_ms)
        for i, q in enumerate(queries):
            if answers[i] is None:
                answers[i] = self._cold_start(snapshot, q)
        return answers  # type: ignore[return-value]

    def _mask(self, snapshot: ModelSnapshot, q: Query, state: UserState | None) -> Tensor:
        """Catalog columns the answer must not contain."""
        banned = torch.zeros(len(snapshot.item_keys), dtype=torch.bool, device=snapshot.device)
        for items in (q.exclude, state.seen if (state is not None and q.exclude_seen) else None):
            if items is not None and len(items):
                cols, found = snapshot.columns(items)
                banned[cols[found]] = True
        return banned

    def _top_k(self, snapshot: ModelSnapshot, q: Query, state: UserState, scores: Tensor, now_ms: int) -> Answer:
        scores = scores.masked_fill(self._mask(snapshot, q, state), float("-inf"))
        k = min(q.k, int(torch.isfinite(scores).sum()))
        top = torch.topk(scores, k)
        return Answer(snapshot.item_keys[top.indices].cpu().numpy(), top.values.float().cpu().numpy(),
                      snapshot.version, state.state_version, max(0, now_ms - state.last_event_time_ms), False)

    def _rank_candidates(self, snapshot: ModelSnapshot, q: Query, state: UserState, cache: KVCache,
                         hidden: Tensor, row: int, now_ms: int) -> Answer:
        cols, found = snapshot.columns(q.candidates)  # type: ignore[arg-type]
        banned = self._mask(snapshot, q, state)
        keep = found & ~banned[cols]
        cols = cols[keep]
        one = KVCache([(k[row:row + 1], v[row:row + 1]) for k, v in cache.layers], cache.valid[row:row + 1],
                      cache.next_pos[row:row + 1])
        logits = snapshot.model.ranking_scores(one, hidden[row:row + 1], snapshot.ranking_rows[cols][None])[0]
        top = torch.topk(logits, min(q.k, len(cols)))
        return Answer(snapshot.item_keys[cols[top.indices]].cpu().numpy(), top.values.float().cpu().numpy(),
                      snapshot.version, state.state_version, max(0, now_ms - state.last_event_time_ms), False)

    def _cold_start(self, snapshot: ModelSnapshot, q: Query) -> Answer:
        """Unknown users get the most popular items (or candidates by popularity), flagged as such."""
        order = snapshot.popular
        if q.candidates is not None:
            cols, found = snapshot.columns(q.candidates)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order), device=order.device)
            cols = cols[found]
            order = cols[torch.argsort(rank[cols])]
        banned = self._mask(snapshot, q, None)
        order = order[~banned[order]][: q.k]
        n = len(order)
        return Answer(snapshot.item_keys[order].cpu().numpy(), np.linspace(1.0, 0.0, n, dtype=np.float32) if n else
                      np.zeros(0, np.float32), snapshot.version, -1, 0, True)


class HistoryStateSource:
    """The naive path: re-encode each user's raw history on every request (the benchmark baseline)."""

    def __init__(self, histories: dict[int, tuple[np.ndarray, np.ndarray, int, int]]) -> None:
        # user -> (items, actions, last event offset, last event time ms)
        self.histories = histories

    def get(self, user_ids: list[int], snapshot: ModelSnapshot) -> list[UserState | None]:
        out: list[UserState | None] = []
        for user in user_ids:
            entry = self.histories.get(user)
            if entry is None or not len(entry[0]):
                out.append(None)
                continue
            items, actions, offset, time_ms = entry
            cols, found = snapshot.columns(items)
            emb = torch.where(found[:, None], snapshot.item_rows[cols], torch.zeros((), device=snapshot.device))
            acts = torch.from_numpy(actions.astype(np.int64)).to(snapshot.device)
            cache = snapshot.model.encode(emb[None], acts[None])
            out.append(UserState(cache, items, offset, time_ms))
        return out
