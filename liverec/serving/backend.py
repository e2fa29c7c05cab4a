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
    batch: KVCache  # a decoded batch on the snapshot's device; this user is row `row` of it
    row: int
    seen: np.ndarray  # int64 items of the history the state covers
    state_version: int
    last_event_time_ms: int

    @property
    def cache(self) -> KVCache:
        """This user's own one-row cache (sources decode whole batches; the scorer reads rows)."""
        r = slice(self.row, self.row + 1)
        return KVCache([(k[r], v[r]) for k, v in self.batch.layers], self.batch.valid[r], self.batch.next_pos[r])


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


def select_rows(cache: KVCache, rows: Tensor) -> KVCache:
    """The users `rows` of a batch cache, in that order."""
    return KVCache([(k.index_select(0, rows), v.index_select(0, rows)) for k, v in cache.layers],
                   cache.valid.index_select(0, rows), cache.next_pos.index_select(0, rows))


def batch_cache(states: list[UserState], device: torch.device) -> KVCache:
    """The states' caches as one batch: rows of their common decoded batch when they share one
    (the replica's case: one decode per request batch), else stacked."""
    first = states[0].batch
    if all(s.batch is first for s in states):
        rows = [s.row for s in states]
        if rows == list(range(int(first.valid.shape[0]))):
            return first
        return select_rows(first, torch.tensor(rows, dtype=torch.long, device=device))
    return stack_caches([s.cache for s in states])


def pairs(lists: list[list[np.ndarray | None]]) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs of every item in each row's arrays: one flat form for one scatter."""
    rows, items = [], []
    for row, arrays in enumerate(lists):
        for a in arrays:
            if a is not None and len(a):
                rows.append(np.full(len(a), row, np.int64))
                items.append(np.asarray(a, dtype=np.int64))
    if not items:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(items)


class Scorer:
    """Answers a batch of queries with one forward pass for all warm users.

    Everything per batch runs as batched tensor work with a fixed number of device round trips
    (one device-to-host copy of the top-k of all full-catalog queries, one of all candidate
    queries): per-query loops only build index arrays on the host. On a GPU, a per-query
    `topk(...).cpu()` would cost a synchronisation each and serialise the batch.
    """

    def __init__(self, states: StateSource) -> None:
        self.states = states

    @torch.no_grad()
    def recommend(self, snapshot: ModelSnapshot, queries: list[Query]) -> list[Answer]:
        states = self.states.get([q.user_id for q in queries], snapshot)
        now_ms = int(time.time() * 1000)
        answers: list[Answer | None] = [None] * len(queries)
        warm = [i for i, s in enumerate(states) if s is not None]
        if warm and not len(snapshot.item_keys):  # nothing to rank yet: empty, but not cold-start, answers
            nothing = torch.zeros(len(warm), 0)
            self._answer(snapshot, [queries[i] for i in warm], [states[i] for i in warm],  # type: ignore[misc]
                         nothing.long(), nothing, now_ms, warm, answers)
        elif warm:
            warm_states: list[UserState] = [states[i] for i in warm]  # type: ignore[misc]
            cache = batch_cache(warm_states, snapshot.device)
            hidden = snapshot.model.user_hidden(cache)
            full = [j for j, i in enumerate(warm) if queries[i].candidates is None]
            ranked = [j for j, i in enumerate(warm) if queries[i].candidates is not None]
            if full:
                self._retrieve(snapshot, [queries[warm[j]] for j in full], [warm_states[j] for j in full],
                               hidden[full], now_ms, [warm[j] for j in full], answers)
            if ranked:
                rows = torch.tensor(ranked, dtype=torch.long, device=snapshot.device)
                self._rank(snapshot, [queries[warm[j]] for j in ranked], [warm_states[j] for j in ranked],
                           select_rows(cache, rows), hidden[rows], now_ms, [warm[j] for j in ranked], answers)
        for i, q in enumerate(queries):
            if answers[i] is None:
                answers[i] = self._cold_start(snapshot, q)
        return answers  # type: ignore[return-value]

    def _banned(self, snapshot: ModelSnapshot, queries: list[Query], states: list[UserState]) -> Tensor:
        """`[B, N]` catalog columns each answer must not contain."""
        rows, items = pairs([[q.exclude, s.seen if q.exclude_seen else None] for q, s in zip(queries, states)])
        banned = torch.zeros(len(queries), len(snapshot.item_keys), dtype=torch.bool, device=snapshot.device)
        if len(items):
            cols, found = snapshot.columns(items)
            r = torch.from_numpy(rows).to(snapshot.device)
            banned[r[found], cols[found]] = True
        return banned

    def _retrieve(self, snapshot: ModelSnapshot, queries: list[Query], states: list[UserState], hidden: Tensor,
                  now_ms: int, slots: list[int], answers: list[Answer | None]) -> None:
        """Full-catalog top-k of every query at once."""
        scores = snapshot.model.retrieval_scores(hidden, snapshot.retrieval_rows)
        scores = scores.masked_fill(self._banned(snapshot, queries, states), float("-inf"))
        k = min(max(q.k for q in queries), scores.shape[1])
        top = torch.topk(scores, k)
        self._answer(snapshot, queries, states, snapshot.item_keys[top.indices], top.values, now_ms, slots, answers)

    def _rank(self, snapshot: ModelSnapshot, queries: list[Query], states: list[UserState], cache: KVCache,
              hidden: Tensor, now_ms: int, slots: list[int], answers: list[Answer | None]) -> None:
        """Target attention over each query's candidates, padded to the longest list."""
        width = max(len(q.candidates) for q in queries)  # type: ignore[arg-type]
        rows, items = pairs([[q.candidates] for q in queries])
        device = snapshot.device
        cols, found = snapshot.columns(items)
        r = torch.from_numpy(rows).to(device)
        position = torch.from_numpy(np.concatenate([np.arange(len(q.candidates)) for q in queries])).to(device)  # type: ignore[arg-type]
        keep = found & ~self._banned(snapshot, queries, states)[r, cols]
        grid_cols = torch.zeros(len(queries), max(width, 1), dtype=torch.long, device=device)
        grid_keep = torch.zeros(len(queries), max(width, 1), dtype=torch.bool, device=device)
        grid_cols[r, position] = cols
        grid_keep[r, position] = keep
        logits = snapshot.model.ranking_scores(cache, hidden, snapshot.ranking_rows[grid_cols])
        logits = logits.masked_fill(~grid_keep, float("-inf"))
        top = torch.topk(logits, min(max(q.k for q in queries), logits.shape[1]))
        keys = snapshot.item_keys[grid_cols.gather(1, top.indices)]
        self._answer(snapshot, queries, states, keys, top.values, now_ms, slots, answers)

    @staticmethod
    def _answer(snapshot: ModelSnapshot, queries: list[Query], states: list[UserState], keys: Tensor,
                values: Tensor, now_ms: int, slots: list[int], answers: list[Answer | None]) -> None:
        """One copy to the host for the whole batch; each answer keeps its k finite entries."""
        keys_np, values_np = keys.cpu().numpy(), values.float().cpu().numpy()
        for row, (q, s, slot) in enumerate(zip(queries, states, slots)):
            n = min(q.k, int(np.isfinite(values_np[row]).sum()))
            answers[slot] = Answer(keys_np[row, :n].copy(), values_np[row, :n].copy(), snapshot.version,
                                   s.state_version, max(0, now_ms - s.last_event_time_ms), False)

    def _cold_start(self, snapshot: ModelSnapshot, q: Query) -> Answer:
        """Unknown users get the most popular items (or candidates by popularity), flagged as such."""
        order = snapshot.popular
        if q.candidates is not None:
            cols, found = snapshot.columns(q.candidates)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order), device=order.device)
            cols = cols[found]
            order = cols[torch.argsort(rank[cols])]
        if q.exclude is not None and len(q.exclude):
            cols, found = snapshot.columns(q.exclude)
            banned = torch.zeros(len(snapshot.item_keys), dtype=torch.bool, device=snapshot.device)
            banned[cols[found]] = True
            order = order[~banned[order]]
        order = order[: q.k]
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
            out.append(UserState(cache, 0, items, offset, time_ms))
        return out
