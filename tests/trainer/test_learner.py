"""OnlineLearner: replay of stored users, its restorable user set, and what a step trains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from liverec.embedding_store.config import TableConfig
from liverec.embedding_store.store import EmbeddingStore
from liverec.model.config import EncoderConfig, ModelConfig
from liverec.platform.config import ConfigError, LiverecConfig, TrainerConfig
from liverec.trainer.decode import EventBatch
from liverec.trainer.history import HistoryStore
from liverec.trainer.items import ITEM_TABLE, StoreItemTable
from liverec.trainer.learner import OnlineLearner
from liverec.trainer.worker import item_table_config

MAX_LEN = 4
MODEL = ModelConfig(encoder=EncoderConfig(dim=16, layers=1, heads=1, max_len=MAX_LEN, dropout=0.0))


def make_learner(history: HistoryStore, replay_users: int) -> tuple[OnlineLearner, EmbeddingStore]:
    store = EmbeddingStore([TableConfig(name=ITEM_TABLE, dim=16, optimizer="adagrad", lr=0.05)], seed=0)
    learner = OnlineLearner(MODEL, StoreItemTable(store), history, negatives=1, dense_lr=1e-3, seed=0,
                            replay_users=replay_users)
    return learner, store


def events(pairs: list[tuple[int, int]], t0: int) -> EventBatch:
    users, items = (np.array(c, dtype=np.int64) for c in zip(*pairs))
    n = len(pairs)
    return EventBatch(user_id=users, item_id=items, action=np.full(n, 5, np.int8), value=np.full(n, np.nan),
                      event_time_ms=(t0 + np.arange(n)) * 1000, partition=np.zeros(n, np.int32),
                      offset=np.arange(n, dtype=np.int64))


FIRST = [(1, 10), (2, 20), (1, 11), (3, 30), (2, 21), (1, 12), (1, 13), (1, 14), (3, 31)]


@pytest.fixture
def history(tmp_path: Path):
    store = HistoryStore(tmp_path / "history", MAX_LEN)
    yield store
    store.close()


def test_replay_draws_stored_windows_of_known_users_outside_the_batch(history: HistoryStore) -> None:
    learner, _ = make_learner(history, replay_users=50)
    assert learner._replay_windows(np.array([1])) is None  # nobody known yet
    learner.step(events(FIRST, 0))
    w = learner._replay_windows(np.array([3]))
    assert w is not None
    stored = dict(zip([1, 2], history.get_many(np.array([1, 2]))))
    assert len(w.items) == 2  # users 1 and 2 (50 draws among 3 users), never 3, each once
    for row in range(2):
        kept = w.items[row][w.valid[row]]
        user = 1 if len(kept) == MAX_LEN else 2
        assert kept.tolist() == stored[user].item.tolist()
        assert w.valid[row, -len(kept):].all() and not w.valid[row, :-len(kept)].any()  # left-padded
    assert not w.is_new.any()
    assert stored[1].item.tolist() == [11, 12, 13, 14]  # the store keeps max_len events


def test_known_users_are_read_back_from_a_restored_history(tmp_path: Path) -> None:
    first = HistoryStore(tmp_path / "h", MAX_LEN)
    learner, _ = make_learner(first, replay_users=8)
    learner.step(events(FIRST, 0))
    learner.step(events([(-5, 50), (2, 22)], 100))
    assert learner._known_users().tolist() == [-5, 1, 2, 3]
    first.close()
    reopened = HistoryStore(tmp_path / "h", MAX_LEN)
    try:
        restored, _ = make_learner(reopened, replay_users=8)
        assert restored._known_users().tolist() == [-5, 1, 2, 3]
        restored.step(events([(7, 70), (7, 71)], 200))
        assert restored._known_users().tolist() == [-5, 1, 2, 3, 7]
    finally:
        reopened.close()


@pytest.mark.parametrize("replay_users", [0, 8])
def test_replayed_users_items_are_trained_without_new_events(history: HistoryStore, replay_users: int) -> None:
    learner, store = make_learner(history, replay_users=replay_users)
    learner.step(events(FIRST, 0))
    before = dict(zip(*(t.tolist() for t in store.table_items(ITEM_TABLE))))
    learner.step(events([(9, 90), (9, 91), (9, 92)], 100))
    after = dict(zip(*(t.tolist() for t in store.table_items(ITEM_TABLE))))
    moved = {key for key, row in before.items() if after[key] != row}
    # Items 12 and 13 are only ever targets inside user 1's stored window (the one uniform
    # negative per step, drawn with a fixed seed, is neither).
    assert ({12, 13} <= moved) == (replay_users > 0), moved


def test_serving_weights_are_the_moving_average_of_the_trained_ones(tmp_path: Path) -> None:
    def learner_with(ema: float, name: str) -> tuple[OnlineLearner, HistoryStore]:
        history = HistoryStore(tmp_path / name, MAX_LEN)
        store = EmbeddingStore([TableConfig(name=ITEM_TABLE, dim=16, optimizer="adagrad", lr=0.05)], seed=0)
        return OnlineLearner(MODEL, StoreItemTable(store), history, negatives=1, dense_lr=1e-2, seed=0,
                             serving_ema=ema), history

    plain, h1 = learner_with(0.0, "plain")
    averaged, h2 = learner_with(0.5, "averaged")
    try:
        assert plain.serving_model is not plain.model  # a copy: the trainer encodes with it on another thread
        expected = {n: p.detach().clone() for n, p in averaged.model.named_parameters()}
        for step, batch in enumerate((FIRST, FIRST[::-1], FIRST)):
            plain.step(events(batch, 100 * step))
            averaged.step(events(batch, 100 * step))
            live = dict(averaged.model.named_parameters())
            expected = {n: 0.5 * expected[n] + 0.5 * live[n].detach() for n in expected}
        got = dict(averaged.serving_model.named_parameters())
        for name, value in expected.items():
            assert torch.allclose(got[name], value, atol=1e-6), name
        # Averaging only changes what is served: the trained weights follow the same path.
        for (name, a), b in zip(plain.model.named_parameters(), averaged.model.parameters()):
            assert torch.equal(a, b), name
        for (name, a), b in zip(plain.model.named_parameters(), plain.serving_model.parameters()):
            assert torch.equal(a, b), name  # with 0, serving gets exactly the trained weights
        assert any(not torch.equal(a, b) for a, b in zip(averaged.serving_model.parameters(),
                                                        averaged.model.parameters()))
    finally:
        h1.close()
        h2.close()


def test_prequential_test_sees_the_catalog_as_it_was_before_the_batch(tmp_path: Path) -> None:
    """The worker admits events on arrival and learns them later: by the time a batch is tested,
    later batches may have brought new items and counts. The test must not see them."""
    later = [(4, 40), (4, 41), (5, 10), (5, 10), (6, 10), (6, 40), (2, 42)]  # new items; item 10 surges
    batch = [(1, 20), (2, 10), (3, 11), (2, 13)]

    def learner(name: str) -> tuple[OnlineLearner, EmbeddingStore, HistoryStore]:
        history = HistoryStore(tmp_path / name, MAX_LEN)
        return (*make_learner(history, replay_users=0), history)

    in_order, in_order_store, h1 = learner("in_order")
    ahead, ahead_store, h2 = learner("ahead")
    try:
        in_order.step(events(FIRST, 0))
        ahead.step(events(FIRST, 0))
        expected = in_order.step(events(batch, 100))
        ahead.admit(events(batch, 100))
        ahead.admit(events(later, 200))  # received before the batch is learned
        assert len(ahead_store.table(ITEM_TABLE)) > len(in_order_store.table(ITEM_TABLE))
        got = ahead.learn(events(batch, 100))
        assert expected.scored == 4
        assert (got.scored, got.hits, got.pop_hits) == (expected.scored, expected.hits, expected.pop_hits)
        assert got.ndcg_sum == pytest.approx(expected.ndcg_sum, abs=1e-6)
        assert got.pop_ndcg_sum == pytest.approx(expected.pop_ndcg_sum, abs=1e-6)
        ahead.learn(events(later, 200))
        assert not ahead._unlearned  # everything admitted has been learned
    finally:
        h1.close()
        h2.close()


def first_step_size(tmp_path: Path, name: str, warmup: int, version: int = 0) -> float:
    """Largest change of a dense weight in one step. Adam's first step moves every weight with a
    gradient by the learning rate (m/sqrt(v) = ±1), so this reads the rate the step used."""
    history = HistoryStore(tmp_path / name, MAX_LEN)
    try:
        store = EmbeddingStore([TableConfig(name=ITEM_TABLE, dim=16, optimizer="adagrad", lr=0.05)], seed=0)
        learner = OnlineLearner(MODEL, StoreItemTable(store), history, negatives=1, dense_lr=1e-2, seed=0,
                                dense_warmup_steps=warmup)
        learner.version = version  # as a restored checkpoint sets it
        before = [p.detach().clone() for p in learner.model.parameters()]
        learner.step(events(FIRST, 0))
        return max(float((p.detach() - b).abs().max()) for p, b in zip(learner.model.parameters(), before))
    finally:
        history.close()


def test_dense_warmup_ramps_the_learning_rate_from_a_fresh_model_only(tmp_path: Path) -> None:
    assert first_step_size(tmp_path, "plain", warmup=0) == pytest.approx(1e-2, rel=1e-4)
    assert first_step_size(tmp_path, "fresh", warmup=4) == pytest.approx(1e-2 / 4, rel=1e-4)
    # A model restored past (or into) its warmup continues the ramp where its version says.
    assert first_step_size(tmp_path, "restored", warmup=4, version=4) == pytest.approx(1e-2, rel=1e-4)
    assert first_step_size(tmp_path, "midway", warmup=4, version=2) == pytest.approx(1e-2 * 3 / 4, rel=1e-4)


def test_dense_warmup_reaches_the_configured_rate_and_stays(history: HistoryStore) -> None:
    store = EmbeddingStore([TableConfig(name=ITEM_TABLE, dim=16, optimizer="adagrad", lr=0.05)], seed=0)
    learner = OnlineLearner(MODEL, StoreItemTable(store), history, negatives=1, dense_lr=1e-3, seed=0,
                            dense_warmup_steps=3)
    used = []
    for step in range(5):
        learner.step(events(FIRST, 100 * step))
        used.append(learner.optimizer.param_groups[0]["lr"])
    assert used == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3])


def test_trainer_config_passes_the_warmup_to_the_learner_and_rejects_a_negative_one(history: HistoryStore) -> None:
    config = LiverecConfig(model=MODEL, trainer=TrainerConfig(dense_warmup_steps=7))
    store = EmbeddingStore([TableConfig(name=ITEM_TABLE, dim=16, optimizer="adagrad", lr=0.05)], seed=0)
    assert OnlineLearner.from_config(config, StoreItemTable(store), history).dense_warmup_steps == 7
    with pytest.raises(ConfigError, match="trainer.dense_warmup_steps"):
        TrainerConfig(dense_warmup_steps=-1)


@pytest.mark.parametrize("optimizer, lr, state", [("adam", 1e-3, "exp_avg_sq"), ("adagrad", 0.15, "accumulator")])
def test_item_table_uses_the_configured_optimizer(history: HistoryStore, optimizer: str, lr: float, state: str) -> None:
    config = LiverecConfig(model=MODEL, trainer=TrainerConfig(item_optimizer=optimizer, item_lr=lr))
    store = EmbeddingStore([item_table_config(config)], seed=0)
    table = store.table(ITEM_TABLE)
    assert (table.config.optimizer, table.config.lr) == (optimizer, lr)
    learner = OnlineLearner.from_config(config, StoreItemTable(store), history)
    learner.step(events(FIRST, 0))
    rows = store.lookup(ITEM_TABLE, torch.tensor([10, 11, 20]))
    # The learned items' rows carry the optimizer's own state, and it has moved from its start.
    assert bool((table.state[state][rows] != 0).any(dim=1).all())


def test_trainer_config_rejects_an_unknown_item_optimizer() -> None:
    with pytest.raises(ConfigError, match="trainer.item_optimizer"):
        TrainerConfig(item_optimizer="lion")
