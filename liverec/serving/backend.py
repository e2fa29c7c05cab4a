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

import copy
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from liverec.model.encoder import KVCache
from liverec.model.recommender import SequentialRecommender
from liverec.serving.params import ParamsVersion

ITEM_TABLE = "item"
GRAPH_MIN_K = 16  # the smallest top-k a graph computes: every k up to it shares one graph per batch size
GRAPH_WARM_BATCHES = 64  # graphs captured up front cover padded batch sizes up to this (larger: on first use)
# One CUDA graph capture at a time in the process: torch.cuda.graph captures on one stream shared
# by every instance, and a second capture begun on it meanwhile fails ("operation cannot be
# performed in the present state"). A replica does capture from two threads: its parameter thread
# warms the graphs of a grown catalog while its batcher may capture a batch size on first use.
_CAPTURE_LOCK = threading.Lock()


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


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _weights(model: torch.nn.Module) -> list[Tensor]:
    return list(model.state_dict(keep_vars=True).values())


@dataclass(frozen=True)
class _Inputs:
    """Static inputs of the graphs of one padded batch size: a left-padded cache and the ban mask."""

    layers: list[tuple[Tensor, Tensor]]  # [Bp, H, width, D/H] each
    valid: Tensor  # [Bp, width] bool
    next_pos: Tensor  # [Bp] long
    banned: Tensor  # [Bp, capacity] bool; all False between batches


@dataclass(frozen=True)
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None on CPU: the same pass runs eagerly
    values: Tensor  # [Bp, Kp] static outputs
    keys: Tensor
    host_values: Tensor  # pinned host copies, read after the one synchronisation per batch
    host_keys: Tensor


class FullCatalogGraphs:
    """The full-catalog pass (query pass, scores, bans, top-k, item keys) as CUDA graphs over
    static buffers: one graph per padded batch size (powers of two) and k (powers of two from
    GRAPH_MIN_K).

    Why: eagerly that pass is about a hundred small kernels whose launches (Python dispatch, with
    the interpreter lock held) cost far more than the GPU work, and the gRPC event loop needs that
    lock. A replay launches them all at once.

    Graphs capture addresses, not values, so they outlive parameter versions (the trainer
    publishes one a second; recapturing per version would stall serving): a batch whose snapshot
    is not the one loaded first copies that snapshot's weights and catalog into the static
    buffers. Copies and replays are ordered on one stream, so earlier batches read the old
    version and every batch reads exactly one. Histories are left-padded to the model's window
    (`max_len`), batches padded with empty rows (nothing valid), and the catalog to `capacity`
    columns that score -inf (the answer keeps finite entries only). On a CPU the same static-shape
    pass runs eagerly, so tests check it there too.
    """

    def __init__(self, snapshot: ModelSnapshot, width: int) -> None:
        self.device = snapshot.device
        self.config = snapshot.model.config
        self.width = width
        n = len(snapshot.item_keys)
        self.capacity = -(-(n + n // 8 + 1) // 1024) * 1024  # room to grow; >= n + 1 (a spare column)
        self.model = copy.deepcopy(snapshot.model).eval().requires_grad_(False)
        self._weights = _weights(self.model)
        d = snapshot.retrieval_rows.shape[1]
        self.rows = torch.zeros(self.capacity, d, dtype=snapshot.retrieval_rows.dtype, device=self.device)
        self.keys = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
        self.pad = torch.ones(self.capacity, dtype=torch.bool, device=self.device)
        self._loaded: weakref.ref[ModelSnapshot] | None = None
        self._inputs: dict[int, _Inputs] = {}
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._lock = threading.Lock()

    def holds(self, snapshot: ModelSnapshot) -> bool:
        """Whether the static buffers hold this snapshot's version now."""
        return self._loaded is not None and self._loaded() is snapshot

    def fits(self, snapshot: ModelSnapshot) -> bool:
        """Whether this snapshot's version can be loaded into these buffers (else: new graphs)."""
        return (snapshot.model.config == self.config and snapshot.device == self.device
                and len(snapshot.item_keys) < self.capacity
                and all(a.shape == b.shape and a.dtype == b.dtype
                        for a, b in zip(_weights(snapshot.model), self._weights, strict=True)))

    @torch.no_grad()
    def top(self, snapshot: ModelSnapshot, cache: KVCache, queries: list[Query],
            states: list[UserState]) -> tuple[np.ndarray, np.ndarray]:
        """Host (values, item keys) `[B, Kp]` of each query's top Kp >= k, best first."""
        b = len(queries)
        bp, kp = _pow2(b), self._k(max(q.k for q in queries))
        with self._lock:
            self._load(snapshot)
            inp = self._inputs_for(bp)
            self._fill(inp, cache, b)
            banned = self._ban(inp, snapshot, queries, states)
            graph = self._graph(bp, kp)
            if graph.graph is not None:
                graph.graph.replay()
                values, keys = graph.values, graph.keys
            else:
                values, keys = self._pass(inp, kp)
            if banned is not None:
                inp.banned[banned] = False
            graph.host_values.copy_(values, non_blocking=True)
            graph.host_keys.copy_(keys, non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            return graph.host_values[:b].numpy().copy(), graph.host_keys[:b].numpy().copy()

    @torch.no_grad()
    def warm(self, snapshot: ModelSnapshot, batch: int = GRAPH_WARM_BATCHES, k: int = GRAPH_MIN_K) -> None:
        """Capture the graphs of every padded batch size up to `batch` for top-`k` now, so that no
        request waits for a capture later."""
        with self._lock:
            self._load(snapshot)
            for bp in (1 << i for i in range(_pow2(batch).bit_length())):
                self._inputs_for(bp)
                self._graph(bp, self._k(k))

    def _k(self, k: int) -> int:
        return min(self.capacity, max(GRAPH_MIN_K, _pow2(k)))

    def _load(self, snapshot: ModelSnapshot) -> None:
        """Make the static buffers hold `snapshot`'s version (a no-op when they already do)."""
        if self.holds(snapshot):
            return
        for dst, src in zip(self._weights, _weights(snapshot.model), strict=True):
            dst.copy_(src)
        n = len(snapshot.item_keys)
        self.rows[:n].copy_(snapshot.retrieval_rows)
        self.keys[:n].copy_(snapshot.item_keys)
        self.pad[:n].fill_(False)
        self.pad[n:].fill_(True)
        self._loaded = weakref.ref(snapshot)

    def _inputs_for(self, bp: int) -> _Inputs:
        inp = self._inputs.get(bp)
        if inp is None:
            enc = self.config.encoder
            shape = (bp, enc.heads, self.width, enc.head_dim)
            dtype = self._weights[0].dtype
            layers = [(torch.zeros(shape, dtype=dtype, device=self.device),
                       torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(enc.layers)]
            inp = _Inputs(layers, torch.zeros(bp, self.width, dtype=torch.bool, device=self.device),
                          torch.zeros(bp, dtype=torch.long, device=self.device),
                          torch.zeros(bp, self.capacity, dtype=torch.bool, device=self.device))
            self._inputs[bp] = inp
        return inp

    def _fill(self, inp: _Inputs, cache: KVCache, b: int) -> None:
        """The batch's cache into the right end of the static slots; rows past `b` hold nothing."""
        start = self.width - int(cache.valid.shape[1])
        for (k_in, v_in), (k, v) in zip(inp.layers, cache.layers, strict=True):
            k_in[:b, :, start:].copy_(k)
            v_in[:b, :, start:].copy_(v)
        inp.valid[:b, :start].fill_(False)
        inp.valid[:b, start:].copy_(cache.valid)
        inp.valid[b:].fill_(False)
        inp.next_pos[:b].copy_(cache.next_pos)

    def _ban(self, inp: _Inputs, snapshot: ModelSnapshot,
             queries: list[Query], states: list[UserState]) -> tuple[Tensor, Tensor] | None:
        """Set the batch's banned (row, column) pairs; returns them, to clear after the pass.
        Ids outside the catalog go to the spare column past it, which scores -inf anyway."""
        rows, items = pairs([[q.exclude, s.seen if q.exclude_seen else None] for q, s in zip(queries, states)])
        if not len(items):
            return None
        cols, found = snapshot.columns(items)
        index = (torch.from_numpy(rows).to(self.device), torch.where(found, cols, self.capacity - 1))
        inp.banned[index] = True
        return index

    def _pass(self, inp: _Inputs, kp: int) -> tuple[Tensor, Tensor]:
        """What a graph holds: top-kp scores and item keys of every padded row."""
        hidden = self.model.user_hidden(KVCache(inp.layers, inp.valid, inp.next_pos))
        scores = self.model.retrieval_scores(hidden, self.rows)
        scores = scores.masked_fill(inp.banned | self.pad, float("-inf"))
        top = torch.topk(scores, kp)
        return top.values.float(), self.keys[top.indices]

    def _graph(self, bp: int, kp: int) -> _Graph:
        graph = self._graphs.get((bp, kp))
        if graph is not None:
            return graph
        inp = self._inputs[bp]
        cuda = self.device.type == "cuda"
        if cuda:
            # One eager pass on a side stream first (lazy initialisation, e.g. cuBLAS
            # workspaces, must not happen inside a capture); other threads may use the GPU
            # meanwhile (thread_local capture mode).
            with _CAPTURE_LOCK:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    self._pass(inp, kp)
                torch.cuda.current_stream(self.device).wait_stream(side)
                cuda_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(cuda_graph, capture_error_mode="thread_local"):
                    values, keys = self._pass(inp, kp)
        else:
            cuda_graph, (values, keys) = None, self._pass(inp, kp)
        graph = _Graph(cuda_graph, values, keys, torch.empty(values.shape, dtype=values.dtype, pin_memory=cuda),
                       torch.empty(keys.shape, dtype=keys.dtype, pin_memory=cuda))
        self._graphs[(bp, kp)] = graph
        return graph


class Scorer:
    """Answers a batch of queries with one forward pass for all warm users.

    Everything per batch runs as batched tensor work with a fixed number of device round trips
    (one device-to-host copy of the top-k of all full-catalog queries, one of all candidate
    queries): per-query loops only build index arrays on the host. On a GPU, a per-query
    `topk(...).cpu()` would cost a synchronisation each and serialise the batch.

    `graphs`: run the full-catalog queries through `FullCatalogGraphs` (default: on CUDA
    devices, where launches dominate; on a CPU the padded static shapes would only add work).
    """

    def __init__(self, states: StateSource, graphs: bool | None = None) -> None:
        self.states = states
        self._use_graphs = graphs
        self._graphs: FullCatalogGraphs | None = None

    def warm(self, snapshot: ModelSnapshot, batch: int = GRAPH_WARM_BATCHES) -> None:
        """Capture the full-catalog graphs for batches up to `batch` now (see FullCatalogGraphs.warm)."""
        if len(snapshot.item_keys) and self._wants_graphs(snapshot):
            self._graphs_for(snapshot).warm(snapshot, batch)

    def _wants_graphs(self, snapshot: ModelSnapshot) -> bool:
        return snapshot.device.type == "cuda" if self._use_graphs is None else self._use_graphs

    def _graphs_for(self, snapshot: ModelSnapshot) -> FullCatalogGraphs:
        """The graphs, rebuilt when the model's shape or the device changes or the catalog outgrows them."""
        if self._graphs is None or not (self._graphs.holds(snapshot) or self._graphs.fits(snapshot)):
            self._graphs = FullCatalogGraphs(snapshot, snapshot.model.config.encoder.max_len)
        return self._graphs

    @torch.no_grad()
    def recommend(self, snapshot: ModelSnapshot, queries: list[Query]) -> list[Answer]:
        states = self.states.get([q.user_id for q in queries], snapshot)
        now_ms = int(time.time() * 1000)
        answers: list[Answer | None] = [None] * len(queries)
        warm = [i for i, s in enumerate(states) if s is not None]
        if warm and not len(snapshot.item_keys):  # nothing to rank yet: empty, but not cold-start, answers
            nothing = np.zeros((len(warm), 0), np.float32)
            self._answer(snapshot, [queries[i] for i in warm], [states[i] for i in warm],  # type: ignore[misc]
                         nothing.astype(np.int64), nothing, now_ms, warm, answers)
        elif warm:
            warm_states: list[UserState] = [states[i] for i in warm]  # type: ignore[misc]
            cache = batch_cache(warm_states, snapshot.device)
            full = [j for j, i in enumerate(warm) if queries[i].candidates is None]
            ranked = [j for j, i in enumerate(warm) if queries[i].candidates is not None]
            if full:
                sub = cache if len(full) == len(warm) else select_rows(
                    cache, torch.tensor(full, dtype=torch.long, device=snapshot.device))
                self._retrieve(snapshot, [queries[warm[j]] for j in full], [warm_states[j] for j in full],
                               sub, now_ms, [warm[j] for j in full], answers)
            if ranked:
                rows = torch.tensor(ranked, dtype=torch.long, device=snapshot.device)
                sub = select_rows(cache, rows)
                self._rank(snapshot, [queries[warm[j]] for j in ranked], [warm_states[j] for j in ranked],
                           sub, snapshot.model.user_hidden(sub), now_ms, [warm[j] for j in ranked], answers)
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

    def _retrieve(self, snapshot: ModelSnapshot, queries: list[Query], states: list[UserState], cache: KVCache,
                  now_ms: int, slots: list[int], answers: list[Answer | None]) -> None:
        """Full-catalog top-k of every query at once: replayed graphs, or eager tensor work."""
        graphs = self._graphs_for(snapshot) if self._wants_graphs(snapshot) else None
        if graphs is not None and int(cache.valid.shape[1]) <= graphs.width:  # wider: a codec's extra slots
            values_np, keys_np = graphs.top(snapshot, cache, queries, states)
            self._answer(snapshot, queries, states, keys_np, values_np, now_ms, slots, answers)
            return
        hidden = snapshot.model.user_hidden(cache)
        scores = snapshot.model.retrieval_scores(hidden, snapshot.retrieval_rows)
        scores = scores.masked_fill(self._banned(snapshot, queries, states), float("-inf"))
        k = min(max(q.k for q in queries), scores.shape[1])
        top = torch.topk(scores, k)
        self._answer(snapshot, queries, states, snapshot.item_keys[top.indices].cpu().numpy(),
                     top.values.float().cpu().numpy(), now_ms, slots, answers)

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
        self._answer(snapshot, queries, states, keys.cpu().numpy(), top.values.float().cpu().numpy(), now_ms, slots,
                     answers)

    @staticmethod
    def _answer(snapshot: ModelSnapshot, queries: list[Query], states: list[UserState], keys_np: np.ndarray,
                values_np: np.ndarray, now_ms: int, slots: list[int], answers: list[Answer | None]) -> None:
        """From the batch's one host copy: each answer keeps its k finite entries."""
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
