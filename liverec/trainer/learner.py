"""The online learning step, independent of Kafka: one micro-batch of events in, an updated model out.

For each micro-batch, in this order (`admit` does 1, `learn` 2-4, `step` all four):
1. admission: the events' items are counted, and admitted into the item table when frequent
   enough;
2. prequential test: every event that has at least one earlier event of its user is ranked
   against the full catalog by the serving model (what a replica would have answered) as it was
   *before* this batch (and by item popularity, the baseline), giving online HR@10 / NDCG@10
   that no training data has leaked into. "Before" covers the catalog too: items the batch (or
   anything admitted after it) brought are left out, and popularity counts exclude them;
3. training: one window per user (stored history + new events, chunked when a user brings more
   new events than fit) plus the stored windows of `replay_users` users drawn from those seen
   before; next-item softmax (exact over a small catalog, else sampled) + ranking loss on the
   new events (with `history_loss`, on every position of the batch's windows; replayed windows
   always on every position), one dense Adam step plus the item table's sparse step;
4. the user histories are extended.
The worker adds Kafka, checkpoints, the DLQ and metrics around this; `liverec evaluate` drives it
directly over a dataset for the "one streaming pass" model.

The worker calls `admit` as events arrive (their items then have rows, so the user states it
refreshes at once encode them) and runs `learn` on a thread of its own, so every touch of the
item table and every use or update of the serving weights happen under `OnlineLearner.lock`; a
reader holding the lock sees one consistent version of both. The forward and backward passes,
the bulk of a step, run outside it. The prequential test runs in `learn`, not on arrival: it is
the same test (the serving weights have learned only earlier events, and admitted-but-unlearned
items are subtracted from the catalog), batched per micro-batch and off the path that makes an
event servable.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from liverec.model.config import ModelConfig
from liverec.model.metrics import hit_rate, ndcg, target_ranks
from liverec.model.recommender import SequentialRecommender, TrainBatch
from liverec.trainer.decode import EventBatch
from liverec.trainer.history import History, HistoryStore

if TYPE_CHECKING:
    from liverec.platform.config import LiverecConfig

EVAL_K = 10


class ItemTable(Protocol):
    """What the learner needs from the item embedding table (the EmbeddingStore provides it)."""

    def observe(self, keys: Tensor, now_s: int) -> None:
        """Count one occurrence of each key (admission, frequencies, recency)."""

    def embed(self, keys: Tensor) -> Tensor:
        """`[N, D]` rows with autograd; zeros for keys without a row."""

    def step(self, now_s: int) -> None:
        """Apply the sparse optimizer to the rows that received gradients since the last step."""

    def catalog(self) -> tuple[Tensor, Tensor, Tensor]:
        """(keys `[M]`, weights `[M, D]` (no grad), counts `[M]`) of every item with a row."""


class StageClock:
    """Wall time per named stage of a step (laps add up), for the stage-share benchmark and metrics."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


@dataclass(frozen=True)
class Prequential:
    """Sums over the events of one batch ranked before it was learned (model and popularity)."""

    scored: int = 0
    hits: float = 0.0
    ndcg_sum: float = 0.0
    pop_hits: float = 0.0
    pop_ndcg_sum: float = 0.0


@dataclass(frozen=True)
class StepResult:
    events: int
    scored: int
    hits: float
    ndcg_sum: float
    pop_hits: float
    pop_ndcg_sum: float
    loss: float
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Windows:
    """Per-row training windows: left-padded, `L + 1` slots, loss only on this batch's events."""

    items: np.ndarray  # [R, L+1] int64
    actions: np.ndarray  # [R, L+1] int64
    valid: np.ndarray  # [R, L+1] bool
    is_new: np.ndarray  # [R, L+1] bool: the slot holds an event of this batch


def build_windows(users: np.ndarray, histories: list[History], batch: EventBatch, order: np.ndarray,
                  starts: np.ndarray, max_len: int) -> Windows:
    """One or more windows per user: stored history then the new events, chunked to fit `max_len + 1`.

    A user with more new events than half a window gets several rows, each with as much
    preceding context as fits, so every new event is trained on and scored exactly once.
    """
    width = max_len + 1
    chunk = max(1, max_len // 2)
    rows_items, rows_actions, rows_new = [], [], []
    ends = np.append(starts[1:], len(order))
    for hist, start, end in zip(histories, starts.tolist(), ends.tolist()):
        idx = order[start:end]
        seq_items = np.concatenate((hist.item, batch.item_id[idx]))
        seq_actions = np.concatenate((hist.action.astype(np.int64), batch.action[idx].astype(np.int64)))
        first_new = len(hist)
        for c0 in range(first_new, len(seq_items), chunk):
            c1 = min(c0 + chunk, len(seq_items))
            w0 = max(0, c1 - width)
            rows_items.append(seq_items[w0:c1])
            rows_actions.append(seq_actions[w0:c1])
            new = np.zeros(c1 - w0, bool)
            new[c0 - w0:] = True
            rows_new.append(new)
    r = len(rows_items)
    items = np.zeros((r, width), np.int64)
    actions = np.zeros((r, width), np.int64)
    valid = np.zeros((r, width), bool)
    is_new = np.zeros((r, width), bool)
    for i, (it, ac, nw) in enumerate(zip(rows_items, rows_actions, rows_new)):
        n = len(it)
        items[i, width - n:], actions[i, width - n:], is_new[i, width - n:] = it, ac, nw
        valid[i, width - n:] = True
    return Windows(items, actions, valid, is_new)


def concat_windows(a: Windows, b: Windows) -> Windows:
    return Windows(*(np.concatenate((getattr(a, f), getattr(b, f))) for f in ("items", "actions", "valid", "is_new")))


def catalog_ranks(scores: Tensor, catalog_keys: Tensor, targets: Tensor) -> Tensor:
    """Rank of each target among `scores [B, M]` over `catalog_keys`; a target with no row misses."""
    sorted_keys, perm = torch.sort(catalog_keys)
    pos = torch.searchsorted(sorted_keys, targets).clamp(max=max(len(sorted_keys) - 1, 0))
    found = (sorted_keys[pos] == targets) if len(sorted_keys) else torch.zeros_like(targets, dtype=torch.bool)
    if not len(sorted_keys):
        return torch.full_like(targets, 2**31)
    column = perm[pos]
    ranks = target_ranks(scores, column)
    return torch.where(found, ranks, torch.full_like(ranks, 2**31))


def draw_negatives(keys: Tensor, negatives: int, full_softmax_items: int, generator: torch.Generator) -> tuple[Tensor, bool]:
    """(negative ids, whether they are the whole catalog).

    A catalog of at most `full_softmax_items` items is taken whole, in a random order (the
    ranking head reads the first few as its uniform negatives): the softmax is then exact.
    Otherwise `negatives` ids are drawn uniformly with replacement.
    """
    if len(keys) <= full_softmax_items:
        return keys[torch.randperm(len(keys), generator=generator)], True
    return keys[torch.randint(len(keys), (negatives,), generator=generator)], False


class OnlineLearner:
    """Model + dense optimizer + item table + histories; `step` learns from one micro-batch."""

    def __init__(self, model_config: ModelConfig, items: ItemTable, history: HistoryStore, *,
                 negatives: int, dense_lr: float, seed: int, history_loss: bool = False,
                 full_softmax_items: int = 0, replay_users: int = 0, serving_ema: float = 0.0,
                 dense_warmup_steps: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.model = SequentialRecommender(model_config).to(self.device)
        self.serving_ema = serving_ema
        #: What serving receives and states are encoded with: the trained weights' moving
        #: average (trainer.serving_ema), or with 0 their copy after each step. Always a separate
        #: module, so a reader on another thread never sees weights mid-update.
        self.serving_model = copy.deepcopy(self.model).eval()
        self.lock = threading.RLock()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=dense_lr, fused=True)
        self.dense_lr = dense_lr
        self.dense_warmup_steps = dense_warmup_steps
        self.items = items
        self.history = history
        self.negatives = negatives
        self.history_loss = history_loss
        self.full_softmax_items = full_softmax_items
        self.replay_users = replay_users
        self._known: np.ndarray | None = None  # sorted ids of the users with a history; read lazily
        self.max_len = model_config.encoder.max_len
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.version = 0
        #: Occurrences per item admitted (counted by the item table) but not yet learned: what the
        #: prequential test subtracts to see the catalog as it was before the batch it scores.
        self._unlearned: Counter[int] = Counter()

    @classmethod
    def from_config(cls, config: LiverecConfig, items: ItemTable, history: HistoryStore, *, seed: int | None = None,
                    device: torch.device | str = "cpu") -> OnlineLearner:
        """The learner `config.trainer` describes (the worker's, `liverec evaluate`'s, the benchmark's)."""
        tc = config.trainer
        return cls(config.model, items, history, negatives=tc.negatives, dense_lr=tc.dense_lr,
                   seed=tc.seed if seed is None else seed, history_loss=tc.history_loss,
                   full_softmax_items=tc.full_softmax_items, replay_users=tc.replay_users,
                   serving_ema=tc.serving_ema, dense_warmup_steps=tc.dense_warmup_steps, device=device)

    # -- prequential ---------------------------------------------------------------------------

    def _catalog_before(self) -> tuple[Tensor, Tensor, Tensor]:
        """The catalog without what admitted-but-unlearned events added: their counts subtracted,
        items left with none dropped (they had no row before). Under the lock."""
        keys, weights, counts = self.items.catalog()
        if not self._unlearned:
            return keys, weights, counts
        pending_keys = torch.tensor(list(self._unlearned.keys()), dtype=torch.int64)
        pending = torch.tensor(list(self._unlearned.values()), dtype=counts.dtype)
        sorted_keys, perm = torch.sort(pending_keys)
        pos = torch.searchsorted(sorted_keys, keys.cpu()).clamp(max=len(sorted_keys) - 1)
        hit = sorted_keys[pos] == keys.cpu()
        before = counts - torch.where(hit, pending[perm[pos]], 0).to(counts.device)
        keep = before > 0
        return keys[keep], weights[keep], before[keep]

    @torch.no_grad()
    def _prequential(self, w: Windows, targets_mask: np.ndarray) -> Prequential:
        """Ranks by the serving model (always in eval mode). Only the catalog and the windows'
        embeddings (copies) are read under the lock: the serving weights change on this thread
        alone (`learn`'s averaging), so the forward pass need not keep the receiving thread out."""
        n = int(targets_mask.sum())
        if n == 0:
            return Prequential()
        model = self.serving_model
        items = torch.from_numpy(w.items).to(self.device)
        mask = torch.from_numpy(targets_mask).to(self.device)
        # Query tokens only after slots that hold a target, and no event outputs: same ranks.
        slots = mask.any(0).nonzero().squeeze(1)
        with self.lock:
            keys, weights, counts = self._catalog_before()
            emb = self.items.embed(items.reshape(-1)).reshape(*items.shape, -1).detach()
        out = model.encoder(emb[:, :-1], torch.from_numpy(w.actions[:, :-1]).to(self.device),
                            torch.from_numpy(w.valid[:, :-1]).to(self.device), None, slots, hidden=False)
        user_hidden = out.query_hidden[mask[:, slots]]
        scores = model.retrieval_scores(user_hidden, model.retrieval.item_side(weights))
        targets = items[:, 1:][mask]
        ranks = catalog_ranks(scores, keys, targets)
        pop_scores = counts.float()[None, :].expand(len(targets), -1)
        pop_ranks = catalog_ranks(pop_scores, keys, targets)
        return Prequential(n, hit_rate(ranks, EVAL_K).sum().item(), ndcg(ranks, EVAL_K).sum().item(),
                           hit_rate(pop_ranks, EVAL_K).sum().item(), ndcg(pop_ranks, EVAL_K).sum().item())

    # -- training ------------------------------------------------------------------------------

    def _train(self, w: Windows, loss_mask: np.ndarray, now_s: int, clock: StageClock) -> float:
        with self.lock:
            keys, _weights, counts = self.items.catalog()
            if len(keys) == 0 or not loss_mask.any():
                return math.nan
            items = torch.from_numpy(w.items).to(self.device)
            emb = self.items.embed(items.reshape(-1)).reshape(*items.shape, -1)
            neg_ids, full = draw_negatives(keys, self.negatives, self.full_softmax_items, self.generator)
            neg_ids = neg_ids.to(self.device)
            neg_emb = self.items.embed(neg_ids)
        total = counts.sum().clamp(min=1).float()
        log_freq = self._log_freq(keys, counts, total, items)
        batch = TrainBatch(
            item_emb=emb, item_ids=items, actions=torch.from_numpy(w.actions).to(self.device),
            valid=torch.from_numpy(w.valid).to(self.device), log_q=log_freq,
            neg_emb=neg_emb, neg_ids=neg_ids,
            log_q_neg=torch.full((len(neg_ids),), -math.log(len(keys)), device=self.device),
            loss_mask=torch.from_numpy(loss_mask).to(self.device), full_catalog=full,
        )
        clock.lap("store")
        losses = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = self.current_dense_lr()
        self.optimizer.step()
        clock.lap("forward_backward")
        with self.lock:
            self.items.step(now_s)
        clock.lap("store")
        return float(losses.total.detach())

    def current_dense_lr(self) -> float:
        """The dense Adam's learning rate for the next step: ramped linearly over the first
        `dense_warmup_steps` micro-batches of a fresh model (see TrainerConfig.dense_warmup_steps).
        It follows `version`, which a checkpoint restores, so a restarted worker neither warms up
        again nor leaves a replay's learning rates to chance."""
        if self.version >= self.dense_warmup_steps:
            return self.dense_lr
        return self.dense_lr * min(1.0, (self.version + 1) / self.dense_warmup_steps)

    def _known_users(self) -> np.ndarray:
        """Sorted ids of every user with a stored history (read once from the store, e.g. after a
        restore, then kept up to date), so replay draws from a set a checkpoint reproduces."""
        if self._known is None:
            self._known = np.sort(np.fromiter((user for user, _ in self.history.items()), np.int64))
        return self._known

    def _remember(self, users: np.ndarray) -> None:
        known = self._known_users()
        pos = np.searchsorted(known, users)
        present = pos < len(known)
        present[present] = known[pos[present]] == users[present]
        new = users[~present]
        if len(new):
            self._known = np.insert(known, np.searchsorted(known, new), new)

    def _replay_windows(self, users: np.ndarray) -> Windows | None:
        """Stored windows of up to `replay_users` users drawn uniformly from the known users (not
        in this batch), trained on every position alongside the batch: one pass over the stream
        still trains each event many times, on batches mixing many users instead of a burst of one."""
        if self.replay_users == 0 or len(self._known_users()) == 0:
            return None
        known = self._known_users()
        pick = torch.randint(len(known), (self.replay_users,), generator=self.generator).numpy()
        chosen = np.unique(known[pick])
        chosen = chosen[~np.isin(chosen, users)]
        if len(chosen) == 0:
            return None
        width = self.max_len + 1
        items, actions = np.zeros((len(chosen), width), np.int64), np.zeros((len(chosen), width), np.int64)
        valid = np.zeros((len(chosen), width), bool)
        for i, hist in enumerate(self.history.get_many(chosen)):
            n = min(len(hist), width)
            items[i, width - n:], actions[i, width - n:] = hist.item[-n:], hist.action[-n:]
            valid[i, width - n:] = True
        return Windows(items, actions, valid, np.zeros_like(valid))

    @staticmethod
    def _log_freq(keys: Tensor, counts: Tensor, total: Tensor, items: Tensor) -> Tensor:
        """log(count / total) of each window item (in-batch negatives are sampled ∝ frequency)."""
        sorted_keys, perm = torch.sort(keys)
        pos = torch.searchsorted(sorted_keys, items).clamp(max=len(keys) - 1)
        found = sorted_keys[pos] == items
        c = torch.where(found, counts[perm[pos]].float(), torch.ones_like(items, dtype=torch.float))
        return torch.log(c.clamp(min=1.0) / total)

    @torch.no_grad()
    def _average(self) -> None:
        """Move the serving weights towards the trained ones (see TrainerConfig.serving_ema)."""
        d = self.serving_ema
        for avg, live in zip(self.serving_model.parameters(), self.model.parameters()):
            if d == 0:
                avg.copy_(live)
            else:
                avg.mul_(d).add_(live, alpha=1.0 - d)
        for avg, live in zip(self.serving_model.buffers(), self.model.buffers()):
            avg.copy_(live)

    def admit(self, batch: EventBatch) -> None:
        """Count each event's item once (admission, frequencies, recency), before it is learned;
        every admitted batch is then learned, in admission order."""
        if len(batch) == 0:
            return
        now_s = int(batch.event_time_ms.max()) // 1000
        with self.lock:
            self.items.observe(torch.from_numpy(np.ascontiguousarray(batch.item_id)).to(self.device), now_s)
            self._unlearned.update(batch.item_id.tolist())

    def learn(self, batch: EventBatch) -> StepResult:
        """Test an admitted batch (prequential), train on it and extend the histories; returns the
        test's sums, the loss and stage times."""
        if len(batch) == 0:
            return StepResult(0, 0, 0.0, 0.0, 0.0, 0.0, math.nan)
        clock = StageClock()
        order = np.argsort(batch.user_id, kind="stable")
        users, starts = np.unique(batch.user_id[order], return_index=True)
        histories = self.history.get_many(users)
        w = build_windows(users, histories, batch, order, starts, self.max_len)
        # Slot t predicts slot t+1: a target is a new event with a real event right before it.
        targets_mask = w.is_new[:, 1:] & w.valid[:, :-1]
        clock.lap("history")
        test = self._prequential(w, targets_mask)
        clock.lap("prequential")
        now_s = int(batch.event_time_ms.max()) // 1000
        loss_mask = w.valid[:, 1:] & w.valid[:, :-1] if self.history_loss else targets_mask
        replay = self._replay_windows(users)
        if replay is not None:
            w = concat_windows(w, replay)
            loss_mask = np.concatenate((loss_mask, replay.valid[:, 1:] & replay.valid[:, :-1]))
        clock.lap("history")
        loss = self._train(w, loss_mask, now_s, clock)
        with self.lock:
            self._average()
            self.history.append(batch.user_id, batch.item_id, batch.event_time_ms, batch.action)
            self.version += 1
            self._unlearned.subtract(batch.item_id.tolist())
            self._unlearned = +self._unlearned  # drop the items with nothing left unlearned
        self._remember(users)
        clock.lap("history")
        return StepResult(len(batch), test.scored, test.hits, test.ndcg_sum, test.pop_hits, test.pop_ndcg_sum, loss,
                          clock.seconds)

    def step(self, batch: EventBatch) -> StepResult:
        """`admit` then `learn`: one micro-batch, start to end (evaluation, benchmarks)."""
        self.admit(batch)
        return self.learn(batch)
