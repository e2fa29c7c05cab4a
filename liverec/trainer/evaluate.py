"""`liverec evaluate`: leave-one-out quality of the online model, an offline-trained twin and popularity.

Split. Each user's last event (by time; ties keep file order) is held out as the test item;
every other event forms the training split, in the dataset's time order across users. A user
with a single event has nothing to predict from: the event stays in training and the user is
not evaluated.

Models, all trained on the training split only:
- online: a fresh `OnlineLearner`, built as the worker builds it (`OnlineLearner.from_config`:
  same store table, history length, loss, replay, learning rates and warmup), fed the training
  split once in time order in micro-batches of `trainer.batch_events`: the "one streaming pass". Replay
  (`trainer.replay_users`) trains on stored windows of users seen earlier in the pass, never on
  anything the stream has not delivered yet. Its prequential HR@10 / NDCG@10 (and popularity's,
  from the same pass) are reported too.
- offline: the same architecture (same `ModelConfig`, same store table but for its optimizer,
  same loss) trained for several epochs the classic SASRec way: each user's training sequence
  cut into windows of `max_len + 1` events, next-item loss on every position, shuffled
  mini-batches, cosine decay, its own dropout and its own item-table optimizer (`OfflineOptions`,
  defaults tuned on ml-100k's full protocol: a fair baseline, not a straw man). With sampled
  softmax, in-batch negatives cost `M²` for `M` targets in a batch, so mini-batches are sized in
  windows such that `M` stays near the online learner's.
- popularity: item counts over the training split.

Scoring. A user's state is the last `max_len` training events (what the model is trained to
attend to), encoded, then the query token's hidden state against the retrieval item side of
every item with a row in the model's store. An item without a row cannot be ranked: as a target
it is a miss, as a competitor it does not count.

Protocols:
- full (HSTU): the whole catalog, the user's training items excluded (never the target).
- sampled100 (SASRec): the target against 100 items drawn uniformly, without replacement, from
  the dataset's items the user never interacted with (train or test); seeded.

Seeds. One seed's online/offline ratio moves by several percent with the seed (on ml-100k both
models' NDCG@10 have a standard deviation of ~0.004-0.005 over seeds), so a single run can meet
or miss a 95% target by chance. `--seeds` runs the whole evaluation once per seed and reports
each model's mean and standard deviation, the ratios of the means, and at how many seeds each
target was met.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from liverec.embedding_store.config import OPTIMIZERS
from liverec.embedding_store.store import EmbeddingStore
from liverec.model.metrics import summarize, target_ranks
from liverec.model.recommender import SequentialRecommender, TrainBatch
from liverec.platform.config import LiverecConfig
from liverec.platform.datasets import EventTable, UserSequences, load_dataset
from liverec.platform.heap import HeapTrimmer
from liverec.platform.replay import rebase_times
from liverec.trainer.decode import EventBatch
from liverec.trainer.history import HistoryStore
from liverec.trainer.items import ITEM_TABLE, StoreItemTable
from liverec.trainer.learner import OnlineLearner, draw_negatives
from liverec.trainer.worker import item_table_config

MISS = 2**31  # rank of a target that cannot be ranked (no row): a miss at every k, MRR ~ 0
METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR")
MODELS = ("online", "offline", "popularity")
PROTOCOLS = ("full", "sampled100")
SAMPLED_NEGATIVES = 100
QUALITY_NDCG = "NDCG@10"
TARGET_ONLINE_VS_OFFLINE = 0.95
TARGET_VS_POPULARITY = 2.0
RATIO_TARGETS = {"online/offline": TARGET_ONLINE_VS_OFFLINE, "online/popularity": TARGET_VS_POPULARITY,
                 "offline/popularity": TARGET_VS_POPULARITY}
_USER_CHUNK = 256
_COLUMNS = ("user_id", "item_id", "action", "value", "event_time_ms")


# -- the split ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Split:
    """Leave-one-out: the training split, and per evaluated user the held-out item.

    `rows[u]` is user `users[u]`'s row in `train_seq` (every evaluated user has training events).
    `all_seq` holds every event per user (train and test), for the sampled protocol's negatives.
    """

    train: EventTable
    train_seq: UserSequences
    all_seq: UserSequences
    users: np.ndarray
    target: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return int(self.users.shape[0])


def leave_one_out(table: EventTable) -> Split:
    """Hold out each user's last event (users with at least two events); keep time order."""
    all_seq = table.per_user_sequences()
    order = np.argsort(table.user_id, kind="stable")  # time order within a user, as in the CSR
    last = order[all_seq.indptr[1:] - 1]
    held = last[all_seq.lengths() >= 2]
    keep = np.ones(len(table), dtype=bool)
    keep[held] = False
    train = EventTable(**{name: getattr(table, name)[keep] for name in _COLUMNS})
    train_seq = train.per_user_sequences()
    users = table.user_id[held]
    by_user = np.argsort(users)
    users, target = users[by_user], table.item_id[held][by_user]
    return Split(train, train_seq, all_seq, users, target, np.searchsorted(train_seq.user_id, users))


# -- windows over per-user sequences ------------------------------------------------------------


@dataclass(frozen=True)
class Histories:
    """Left-padded event windows `[N, W]`: items (0 in padding), actions, valid."""

    items: np.ndarray
    actions: np.ndarray
    valid: np.ndarray

    def take(self, index: np.ndarray | slice) -> Histories:
        return Histories(self.items[index], self.actions[index], self.valid[index])

    def __len__(self) -> int:
        return int(self.items.shape[0])


def gather_windows(seq: UserSequences, starts: np.ndarray, ends: np.ndarray, width: int) -> Histories:
    """Events `[max(start, end - width), end)` of the CSR arrays, left-padded to `width`."""
    pos = ends[:, None] - width + np.arange(width)[None, :]
    valid = pos >= starts[:, None]
    pos = np.where(valid, pos, 0)
    if len(seq.item_id) == 0:
        return Histories(np.zeros(pos.shape, np.int64), np.zeros(pos.shape, np.int64), valid)
    items = np.where(valid, seq.item_id[pos], 0)
    actions = np.where(valid, seq.action[pos].astype(np.int64), 0)
    return Histories(items, actions, valid)


def recent_histories(split: Split, max_len: int) -> Histories:
    """Each evaluated user's last `max_len` training events: the state the models score from."""
    seq = split.train_seq
    return gather_windows(seq, seq.indptr[split.rows], seq.indptr[split.rows + 1], max_len)


def training_windows(seq: UserSequences, max_len: int) -> Histories:
    """Each user's sequence cut from its end into windows of `max_len + 1` events that overlap by
    one, so every event but a user's first is a target exactly once (users with one event: none)."""
    lengths = seq.lengths()
    count = np.where(lengths >= 2, -(-(lengths - 1) // max_len), 0)
    owner = np.repeat(np.arange(len(seq)), count)
    first = np.cumsum(count) - count
    j = np.arange(int(count.sum())) - np.repeat(first, count)
    ends = seq.indptr[owner + 1] - j * max_len
    starts = np.maximum(seq.indptr[owner], ends - (max_len + 1))
    return gather_windows(seq, starts, ends, max_len + 1)


def csr_expand(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the CSR rows `rows`: (position of the row in `rows`, event index), for every event."""
    starts, ends = indptr[rows], indptr[rows + 1]
    counts = ends - starts
    owner = np.repeat(np.arange(len(rows)), counts)
    offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, np.repeat(starts, counts) + offset


# -- scorers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    """The items a scorer can rank, ascending; scores columns follow this order."""

    keys: Tensor

    def columns(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """(column, found) of each item id; column is 0 where the item has no row."""
        if len(self.keys) == 0:
            return torch.zeros_like(items), torch.zeros_like(items, dtype=torch.bool)
        pos = torch.searchsorted(self.keys, items).clamp(max=len(self.keys) - 1)
        found = self.keys[pos] == items
        return torch.where(found, pos, torch.zeros_like(pos)), found


class Scorer(Protocol):
    catalog: Catalog

    def scores(self, histories: Histories) -> Tensor:
        """`[N, len(catalog.keys)]` scores of every catalog item for each history."""


class PopularityScorer:
    """Item counts over the training split, the same for every user."""

    def __init__(self, train: EventTable) -> None:
        keys, counts = np.unique(train.item_id, return_counts=True)
        self.catalog = Catalog(torch.from_numpy(keys))
        self.counts = torch.from_numpy(counts).float()

    def scores(self, histories: Histories) -> Tensor:
        return self.counts[None, :].expand(len(histories), -1)


class ModelScorer:
    """A model and its item store: encode the history, query token, retrieval scores."""

    def __init__(self, model: SequentialRecommender, store: EmbeddingStore, table: str = ITEM_TABLE) -> None:
        keys, weights = store.table_items(table)
        keys, perm = torch.sort(keys)
        self.catalog = Catalog(keys)
        self.model, self.store, self.table = model, store, table
        with torch.no_grad():
            self.rows = model.item_side(weights[perm]).retrieval

    @torch.no_grad()
    def scores(self, histories: Histories) -> Tensor:
        items = torch.from_numpy(histories.items)
        emb = self.store.embed(self.table, items.reshape(-1)).reshape(*items.shape, -1)
        was_training = self.model.training
        self.model.eval()
        try:
            cache = self.model.encode(emb, torch.from_numpy(histories.actions), torch.from_numpy(histories.valid))
            return self.model.retrieval_scores(self.model.user_hidden(cache), self.rows)
        finally:
            self.model.train(was_training)


# -- protocols ----------------------------------------------------------------------------------


def full_ranks(scores: Tensor, catalog: Catalog, targets: Tensor, seen_owner: Tensor, seen_items: Tensor) -> Tensor:
    """Rank of each target among the whole catalog, excluding the items each user has seen.

    `seen_owner [E]` (row of `scores`) and `seen_items [E]` list the seen (user, item) pairs.
    """
    column, found = catalog.columns(targets)
    seen_col, seen_found = catalog.columns(seen_items)
    exclude = torch.zeros_like(scores, dtype=torch.bool)
    exclude[seen_owner[seen_found], seen_col[seen_found]] = True
    ranks = target_ranks(scores, column, exclude)
    return torch.where(found, ranks, torch.full_like(ranks, MISS))


def sampled_ranks(scores: Tensor, catalog: Catalog, candidates: Tensor, valid: Tensor) -> Tensor:
    """Rank of column 0 of `candidates [N, 1 + K]` (the target) among the valid candidates.

    Candidates without a row in the catalog do not compete; a target without one is a miss.
    """
    column, found = catalog.columns(candidates)
    cand_scores = scores.gather(1, column)
    ranks = target_ranks(cand_scores, torch.zeros(len(candidates), dtype=torch.long), ~(found & valid))
    return torch.where(found[:, 0], ranks, torch.full_like(ranks, MISS))


def sample_negatives(split: Split, num: int = SAMPLED_NEGATIVES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Candidates `[U, 1 + num]` (the target first, then `num` items drawn uniformly without
    replacement from the dataset's items the user never interacted with) and their valid mask
    (False only where a user has fewer than `num` unseen items)."""
    universe = np.unique(split.all_seq.item_id)
    rng = np.random.default_rng(seed)
    user_rows = np.searchsorted(split.all_seq.user_id, split.users)
    chunk = max(1, 4_000_000 // max(len(universe), 1))
    take = min(num, len(universe))
    cands, valid = np.zeros((len(split), 1 + num), np.int64), np.zeros((len(split), 1 + num), bool)
    cands[:, 0], valid[:, 0] = split.target, True
    for a in range(0, len(split), chunk):
        rows = user_rows[a:a + chunk]
        keys = rng.random((len(rows), len(universe)))
        owner, events = csr_expand(split.all_seq.indptr, rows)
        keys[owner, np.searchsorted(universe, split.all_seq.item_id[events])] = np.inf
        picked = np.argpartition(keys, take - 1, axis=1)[:, :take] if take < len(universe) else \
            np.broadcast_to(np.arange(len(universe)), (len(rows), len(universe)))
        cands[a:a + chunk, 1:1 + take] = universe[picked]
        valid[a:a + chunk, 1:1 + take] = np.isfinite(np.take_along_axis(keys, picked, 1))
    cands[~valid] = 0
    return cands, valid


def rank_users(scorer: Scorer, split: Split, histories: Histories, protocol: str,
               candidates: tuple[np.ndarray, np.ndarray] | None = None) -> Tensor:
    """Rank `[U]` of every evaluated user's held-out item under `protocol`."""
    out = []
    seq = split.train_seq
    for a in range(0, len(split), _USER_CHUNK):
        idx = slice(a, a + _USER_CHUNK)
        scores = scorer.scores(histories.take(idx))
        if protocol == "full":
            owner, events = csr_expand(seq.indptr, split.rows[idx])
            out.append(full_ranks(scores, scorer.catalog, torch.from_numpy(split.target[idx]),
                                  torch.from_numpy(owner), torch.from_numpy(seq.item_id[events])))
        elif protocol == "sampled100":
            assert candidates is not None
            out.append(sampled_ranks(scores, scorer.catalog, torch.from_numpy(candidates[0][idx]),
                                     torch.from_numpy(candidates[1][idx])))
        else:
            raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


# -- the online pass ----------------------------------------------------------------------------


def event_batch(table: EventTable, start: int, stop: int) -> EventBatch:
    """Events `[start, stop)` as the decoder would deliver them (one partition, offsets = index)."""
    part = table.slice(start, stop)  # read-only views; the learner wants its own arrays
    return EventBatch(user_id=part.user_id.copy(), item_id=part.item_id.copy(), action=part.action.copy(),
                      value=part.value.copy(), event_time_ms=part.event_time_ms.copy(), partition=np.zeros(len(part), np.int32),
                      offset=np.arange(start, stop, dtype=np.int64))


@dataclass(frozen=True)
class Prequential:
    scored: int
    hr10: float
    ndcg10: float
    pop_hr10: float
    pop_ndcg10: float

    def as_dict(self) -> dict[str, Any]:
        return {"scored": self.scored, "online": {"HR@10": self.hr10, "NDCG@10": self.ndcg10},
                "popularity": {"HR@10": self.pop_hr10, "NDCG@10": self.pop_ndcg10}}


def train_online(train: EventTable, config: LiverecConfig, seed: int, workdir: Path) -> tuple[ModelScorer, Prequential]:
    """One streaming pass of a learner built as `TrainerWorker` builds it, in micro-batches."""
    tc = config.trainer
    store = EmbeddingStore([item_table_config(config)], seed=seed)
    history = HistoryStore(workdir / "history", config.model.encoder.max_len)
    learner = OnlineLearner.from_config(config, StoreItemTable(store), history, seed=seed)
    sums = np.zeros(5)
    heap = HeapTrimmer(tc.heap_trim_growth_mb << 20)
    try:
        for start in range(0, len(train), tc.batch_events):
            stop = min(start + tc.batch_events, len(train))
            r = learner.step(event_batch(train, start, stop))
            heap.maybe_trim()
            sums += (r.scored, r.hits, r.ndcg_sum, r.pop_hits, r.pop_ndcg_sum)
            if start // tc.expire_every_events != stop // tc.expire_every_events:  # as the worker does
                store.expire(int(train.event_time_ms[stop - 1]) // 1000)
    finally:
        history.close()
    n = max(sums[0], 1.0)
    preq = Prequential(int(sums[0]), sums[1] / n, sums[2] / n, sums[3] / n, sums[4] / n)
    return ModelScorer(learner.serving_model, store), preq  # what the trainer serves


# -- the offline twin ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineOptions:
    """The offline twin's training; defaults tuned on ml-100k (full protocol, seed 0): 20 epochs
    of 32 windows at lr 1e-3 with dropout 0.2 beat 10 epochs of 64 windows (NDCG@10 0.109 vs 0.091)."""

    epochs: int = 20
    #: Windows per mini-batch; the targets per batch (≤ windows × max_len) set the softmax's cost.
    batch_windows: int = 32
    #: Multiplier of `trainer.dense_lr` for the dense Adam (2: lr 1e-3 with the default 5e-4, as
    #: tuned); the item table keeps `trainer.item_lr`.
    lr_scale: float = 2.0
    #: Cosine decay of the dense learning rate to 0 over the epochs (else constant).
    cosine: bool = True
    #: The encoder's dropout while training offline (the online learner uses `model.encoder.dropout`).
    dropout: float = 0.2
    #: The item table's optimizer and learning rate while training offline (the online learner
    #: uses `trainer.item_optimizer` / `trainer.item_lr`). Each model gets the one that trains it
    #: best: offline, Adagrad at 0.15 beat Adam at 2e-3 (NDCG@10 over seeds 0-9: 0.1064 vs 0.1056),
    #: while the online pass does better with Adam.
    item_optimizer: str = "adagrad"
    item_lr: float = 0.15

    def __post_init__(self) -> None:
        if self.item_optimizer not in OPTIMIZERS:
            raise ValueError(f"offline item optimizer must be one of {OPTIMIZERS}, got {self.item_optimizer!r}")
        if not self.item_lr > 0:
            raise ValueError(f"offline item lr must be > 0, got {self.item_lr!r}")


def log_frequency(keys: Tensor, counts: Tensor, items: Tensor) -> Tensor:
    """log(count / total) of each item (1 for items without a row), as the online learner's logQ."""
    sorted_keys, perm = torch.sort(keys)
    pos = torch.searchsorted(sorted_keys, items).clamp(max=len(keys) - 1)
    found = sorted_keys[pos] == items
    c = torch.where(found, counts[perm[pos]].float(), torch.ones_like(items, dtype=torch.float))
    return torch.log(c.clamp(min=1.0) / counts.sum().clamp(min=1).float())


def train_offline(train: EventTable, config: LiverecConfig, seed: int, options: OfflineOptions,
                  progress: Callable[[int, float], None] | None = None) -> ModelScorer:
    """The same model and store table, trained for several epochs over per-user windows."""
    tc = config.trainer
    table = dataclasses.replace(item_table_config(config), optimizer=options.item_optimizer, lr=options.item_lr)
    store = EmbeddingStore([table], seed=seed)
    items = StoreItemTable(store)
    now_s = int(train.event_time_ms[-1]) // 1000 if len(train) else 0
    items.observe(torch.from_numpy(np.array(train.item_id)), now_s)  # admission + true counts
    torch.manual_seed(seed)
    encoder = dataclasses.replace(config.model.encoder, dropout=options.dropout)
    model = SequentialRecommender(dataclasses.replace(config.model, encoder=encoder))
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.dense_lr * options.lr_scale)
    windows = training_windows(train.per_user_sequences(), config.model.encoder.max_len)
    steps_per_epoch = max(1, math.ceil(len(windows) / options.batch_windows))
    total = steps_per_epoch * options.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)) if options.cosine else 1.0)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.train()
    for epoch in range(options.epochs):
        losses = []
        for batch in np.array_split(rng.permutation(len(windows)), steps_per_epoch):
            loss = _offline_step(model, optimizer, items, windows.take(batch), tc.negatives, tc.full_softmax_items,
                                 generator, now_s)
            schedule.step()
            if not math.isnan(loss):
                losses.append(loss)
        if progress is not None:
            progress(epoch, float(np.mean(losses)) if losses else math.nan)
    return ModelScorer(model, store)


def _offline_step(model: SequentialRecommender, optimizer: torch.optim.Optimizer, items: StoreItemTable,
                  w: Histories, negatives: int, full_softmax_items: int, generator: torch.Generator,
                  now_s: int) -> float:
    keys, _weights, counts = items.catalog()
    if len(keys) == 0:
        return math.nan
    ids = torch.from_numpy(w.items)
    emb = items.embed(ids.reshape(-1)).reshape(*ids.shape, -1)
    neg_ids, full = draw_negatives(keys, negatives, full_softmax_items, generator)
    batch = TrainBatch(item_emb=emb, item_ids=ids, actions=torch.from_numpy(w.actions),
                       valid=torch.from_numpy(w.valid), log_q=log_frequency(keys, counts, ids),
                       neg_emb=items.embed(neg_ids), neg_ids=neg_ids,
                       log_q_neg=torch.full((len(neg_ids),), -math.log(len(keys))), full_catalog=full)
    losses = model(batch)
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(losses.total):
        items.discard()
        return math.nan
    losses.total.backward()
    optimizer.step()
    items.step(now_s)
    return float(losses.total.detach())


# -- the whole evaluation -----------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    protocols: tuple[str, ...] = ("full",)
    offline: OfflineOptions = OfflineOptions()
    seed: int = 0
    verbose: bool = False


def metrics(ranks: Tensor) -> dict[str, float]:
    """The reported metrics (NDCG@1 equals HR@1 and is left out)."""
    values = summarize(ranks, (1, 5, 10))
    return {m: values[m] for m in METRICS}


def ratios(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """NDCG@10 ratios that the quality targets are stated in."""
    on, off, pop = (results[m][QUALITY_NDCG] for m in MODELS)
    div = lambda a, b: a / b if b > 0 else math.inf if a > 0 else math.nan  # noqa: E731
    return {"online/offline": div(on, off), "online/popularity": div(on, pop), "offline/popularity": div(off, pop)}


def targets_met(r: dict[str, float]) -> dict[str, bool]:
    return {name: r[name] >= target for name, target in RATIO_TARGETS.items()}


def _ratio_text(name: str, value: float, met: bool, note: str = "") -> str:
    return f"{name} {value:.3f} (target ≥ {RATIO_TARGETS[name]:g}: {'met' if met else 'missed'}{note})"


def evaluate(table: EventTable, config: LiverecConfig, options: Options = Options()) -> dict[str, Any]:
    """Train the three models on the leave-one-out training split and score every protocol."""
    def note(message: str) -> None:
        if options.verbose:
            print(message, file=sys.stderr, flush=True)

    split = leave_one_out(table)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="liverec-eval-") as tmp:
        online, preq = train_online(split.train, config, options.seed, Path(tmp))
    seconds["online_pass"] = time.perf_counter() - t0
    note(f"online pass: {len(split.train)} events in {seconds['online_pass']:.1f}s, "
         f"prequential NDCG@10 {preq.ndcg10:.4f}")
    t0 = time.perf_counter()
    offline = train_offline(split.train, config, options.seed, options.offline,
                            lambda e, loss: note(f"offline epoch {e + 1}/{options.offline.epochs}: loss {loss:.4f}"))
    seconds["offline_training"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scorers: dict[str, Scorer] = {"online": online, "offline": offline, "popularity": PopularityScorer(split.train)}
    histories = recent_histories(split, config.model.encoder.max_len)
    protocols: dict[str, Any] = {}
    for protocol in options.protocols:
        candidates = sample_negatives(split, SAMPLED_NEGATIVES, options.seed) if protocol == "sampled100" else None
        results = {name: metrics(rank_users(s, split, histories, protocol, candidates)) for name, s in scorers.items()}
        r = ratios(results)
        protocols[protocol] = {"models": results, "ratios": r, "targets_met": targets_met(r)}
    seconds["scoring"] = time.perf_counter() - t0
    return {
        "dataset": {"events": len(table), "users": int(len(split.all_seq)), "items": table.num_items(),
                    "train_events": len(split.train), "evaluated_users": len(split)},
        "protocols": protocols,
        "prequential": preq.as_dict(),
        "targets": {"metric": QUALITY_NDCG, "protocol": "full", "online/offline": TARGET_ONLINE_VS_OFFLINE,
                    "vs_popularity": TARGET_VS_POPULARITY},
        "setup": {"seed": options.seed, "offline": dataclasses.asdict(options.offline),
                  "model": dataclasses.asdict(config.model),
                  "trainer": {k: getattr(config.trainer, k) for k in
                              ("batch_events", "negatives", "full_softmax_items", "history_loss", "replay_users",
                               "serving_ema", "dense_lr", "dense_warmup_steps", "item_optimizer", "item_lr",
                               "min_count", "item_ttl_s")}},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "online_events_per_s": round(len(split.train) / max(seconds["online_pass"], 1e-9), 1),
    }


def summarize_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per protocol: each model's metrics as mean and sample standard deviation over the runs,
    the NDCG@10 ratios of those means with their targets, and each run's ratios."""
    summary: dict[str, Any] = {}
    for protocol in runs[0]["protocols"]:
        blocks = [run["protocols"][protocol] for run in runs]
        models: dict[str, dict[str, dict[str, float]]] = {}
        for name in blocks[0]["models"]:
            values = {m: np.array([b["models"][name][m] for b in blocks]) for m in METRICS}
            models[name] = {m: {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
                            for m, v in values.items()}
        r = ratios({name: {m: stats["mean"] for m, stats in per.items()} for name, per in models.items()})
        summary[protocol] = {
            "models": models,
            "ratios_of_means": r,
            "targets_met": targets_met(r),
            "per_seed_ratios": [b["ratios"] for b in blocks],
            "seeds_meeting_target": {k: sum(bool(b["targets_met"][k]) for b in blocks) for k in r},
        }
    return summary


def evaluate_seeds(table: EventTable, config: LiverecConfig, options: Options, seeds: Sequence[int]) -> dict[str, Any]:
    """`evaluate` once per seed (all three models retrained), then `summarize_seeds`."""
    runs = [evaluate(table, config, dataclasses.replace(options, seed=seed)) for seed in seeds]
    return {"seeds": list(seeds), "summary": summarize_seeds(runs), "runs": runs}


# -- output -------------------------------------------------------------------------------------


def format_table(report: dict[str, Any]) -> str:
    d = report["dataset"]
    lines = [f"leave-one-out: {d['events']} events, {d['users']} users, {d['items']} items; "
             f"{d['evaluated_users']} users evaluated, {d['train_events']} training events"]
    header = f"{'protocol':<11} {'model':<11}" + "".join(f"{m:>9}" for m in METRICS)
    for protocol, block in report["protocols"].items():
        lines += ["", header, "-" * len(header)]
        for name, values in block["models"].items():
            lines.append(f"{protocol:<11} {name:<11}" + "".join(f"{values[m]:>9.4f}" for m in METRICS))
        parts = [_ratio_text(k, v, block["targets_met"][k]) for k, v in block["ratios"].items()]
        lines.append(f"{QUALITY_NDCG} ratios: " + "; ".join(parts) + ("" if protocol == "full" else
                                                                       " [targets apply to full]"))
    p = report["prequential"]
    lines += ["", f"prequential (one pass, {p['scored']} events scored): online HR@10 {p['online']['HR@10']:.4f} "
                  f"NDCG@10 {p['online']['NDCG@10']:.4f}; popularity HR@10 {p['popularity']['HR@10']:.4f} "
                  f"NDCG@10 {p['popularity']['NDCG@10']:.4f}",
              "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items())
              + f" (online pass {report['online_events_per_s']:,.0f} events/s)"]
    return "\n".join(lines)


def format_seeds_table(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    lines = [f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± sd of each metric"]
    header = f"{'protocol':<11} {'model':<11}" + "".join(f"{m:>16}" for m in METRICS)
    for protocol, block in report["summary"].items():
        lines += ["", header, "-" * len(header)]
        for name, values in block["models"].items():
            lines.append(f"{protocol:<11} {name:<11}"
                         + "".join(f"{values[m]['mean']:>9.4f} ±{values[m]['sd']:.4f}" for m in METRICS))
        parts = [_ratio_text(k, v, block["targets_met"][k],
                             f"; met at {block['seeds_meeting_target'][k]} of {len(seeds)} seeds")
                 for k, v in block["ratios_of_means"].items()]
        lines.append(f"{QUALITY_NDCG} ratios of the means: " + "; ".join(parts))
        lines.append("per seed online/offline: " + ", ".join(
            f"{seed}: {r['online/offline']:.3f}" for seed, r in zip(seeds, block["per_seed_ratios"])))
    return "\n".join(lines)


def parse_seeds(spec: str) -> list[int]:
    """`0,1,2`, `0-4` or a mix (`0-2,7`): distinct seeds in the order given."""
    seeds: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"--seeds: {part.strip()!r} is not a seed or a range like 0-4")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"--seeds: empty range {part.strip()!r}")
        seeds += [seed for seed in range(first, last + 1) if seed not in seeds]
    return seeds


# -- the command --------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_dataset(config: LiverecConfig) -> str:
    base = Path(os.environ.get("LIVEREC_DATA_DIR") or config.data_dir)
    return str((base if base.is_absolute() else REPO_ROOT / base) / "ml-100k")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="liverec evaluate", description=__doc__.split("\n", 1)[0])
    p.add_argument("--dataset", default=None, help="file, directory or 'synthetic' (default: DATA_DIR/ml-100k)")
    p.add_argument("--format", choices=("recbole", "movielens", "sequence"), help="file format (default: detected)")
    p.add_argument("--protocol", choices=(*PROTOCOLS, "all"), default="full")
    p.add_argument("--epochs", type=int, default=OfflineOptions.epochs, help="offline model's epochs")
    p.add_argument("--batch-windows", type=int, default=OfflineOptions.batch_windows,
                   help="offline mini-batch size, in windows of max_len + 1 events")
    p.add_argument("--offline-lr-scale", type=float, default=OfflineOptions.lr_scale,
                   help="offline dense lr = trainer.dense_lr × this")
    p.add_argument("--constant-lr", action="store_true", help="no cosine decay of the offline dense lr")
    p.add_argument("--offline-dropout", type=float, default=OfflineOptions.dropout, help="offline model's dropout")
    p.add_argument("--offline-item-optimizer", choices=OPTIMIZERS, default=OfflineOptions.item_optimizer,
                   help="offline model's item-table optimizer")
    p.add_argument("--offline-item-lr", type=float, default=OfflineOptions.item_lr,
                   help="offline model's item-table learning rate")
    seed = p.add_mutually_exclusive_group()
    seed.add_argument("--seed", type=int, default=None, help="default: trainer.seed")
    seed.add_argument("--seeds", default=None,
                      help="run once per seed (e.g. 0-4 or 0,1,7) and report means, sd and ratios of the means")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", default=None, help="also write the JSON object to this path")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None, config: LiverecConfig) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `liverec evaluate -- --flag ...` (argparse's REMAINDER keeps the "--")
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.batch_windows < 1:
        print("liverec evaluate: --epochs and --batch-windows must be >= 1", file=sys.stderr)
        return 2
    if not 0.0 <= args.offline_dropout < 1.0:
        print("liverec evaluate: --offline-dropout must be in [0, 1)", file=sys.stderr)
        return 2
    try:
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        offline = OfflineOptions(epochs=args.epochs, batch_windows=args.batch_windows,
                                 lr_scale=args.offline_lr_scale, cosine=not args.constant_lr,
                                 dropout=args.offline_dropout, item_optimizer=args.offline_item_optimizer,
                                 item_lr=args.offline_item_lr)
    except ValueError as exc:
        print(f"liverec evaluate: {exc}", file=sys.stderr)
        return 2
    spec = args.dataset or default_dataset(config)
    table, _shift = rebase_times(load_dataset(spec, format=args.format).table)  # the times a replay would give
    options = Options(
        protocols=PROTOCOLS if args.protocol == "all" else (args.protocol,),
        offline=offline,
        seed=config.trainer.seed if args.seed is None else args.seed,
        verbose=not args.quiet,
    )
    results = evaluate(table, config, options) if seeds is None else evaluate_seeds(table, config, options, seeds)
    report = {"dataset_path": spec, **results}
    text = json.dumps(report, indent=None if args.json else 2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(text if args.json else format_table(report) if seeds is None else format_seeds_table(report))
    return 0

