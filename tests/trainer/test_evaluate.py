"""`liverec evaluate`: the leave-one-out split, both protocols, popularity by hand, and a small run end to end."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from liverec.model.config import EncoderConfig, ModelConfig
from liverec.platform.config import LiverecConfig
from liverec.platform.datasets import EventTable, SyntheticConfig, synthetic
from liverec.trainer.evaluate import (
    METRICS,
    MISS,
    MODELS,
    Catalog,
    Histories,
    OfflineOptions,
    PopularityScorer,
    format_table,
    full_ranks,
    leave_one_out,
    main,
    metrics,
    parse_seeds,
    rank_users,
    recent_histories,
    sample_negatives,
    sampled_ranks,
    summarize_seeds,
    train_offline,
    training_windows,
)

A, B, C, D, E, F = 1, 2, 3, 4, 5, 6


@pytest.fixture(autouse=True)
def one_cpu_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def table(events: list[tuple[int, int, int]]) -> EventTable:
    """(user, item, time_s) triples, already in time order."""
    users, items, times = (np.array(c, dtype=np.int64) for c in zip(*events))
    return EventTable(user_id=users, item_id=items, action=np.full(len(events), 5, np.int8),
                      value=np.full(len(events), np.nan), event_time_ms=times * 1000)


# A tiny stream: user 1 has 3 events, user 2 one, user 3 two with equal times (file order breaks
# the tie), user 4 four; users interleave in time.
TINY = [(1, 10, 1), (4, 40, 2), (1, 11, 3), (3, 30, 4), (2, 20, 5), (3, 31, 4 + 1), (4, 41, 6),
        (1, 12, 7), (4, 42, 8), (4, 43, 9)]
TINY_TIES = [(1, 10, 1), (3, 30, 2), (3, 31, 2), (1, 11, 3)]


# -- the split -----------------------------------------------------------------------------------


def test_leave_one_out_holds_out_each_users_last_event_and_keeps_time_order() -> None:
    t = table(TINY)
    split = leave_one_out(t)
    assert split.users.tolist() == [1, 3, 4]  # user 2 has a single event: not evaluated
    assert split.target.tolist() == [12, 31, 43]
    expected = [e for e in TINY if (e[0], e[1]) not in {(1, 12), (3, 31), (4, 43)}]
    assert list(zip(split.train.user_id.tolist(), split.train.item_id.tolist())) == [(u, i) for u, i, _ in expected]
    assert np.all(np.diff(split.train.event_time_ms) >= 0)
    assert 20 in split.train.item_id.tolist()  # the single-event user's event stays in training
    assert split.train_seq.user_id[split.rows].tolist() == [1, 3, 4]
    assert len(split.train) + len(split) == len(t)


def test_leave_one_out_breaks_time_ties_by_file_order() -> None:
    split = leave_one_out(table(TINY_TIES))
    assert split.users.tolist() == [1, 3]
    assert split.target.tolist() == [11, 31]


def test_recent_histories_are_the_last_max_len_training_events_left_padded() -> None:
    split = leave_one_out(table(TINY))
    h = recent_histories(split, 2)
    assert h.items.tolist() == [[10, 11], [0, 30], [41, 42]]
    assert h.valid.tolist() == [[True, True], [False, True], [True, True]]
    h = recent_histories(split, 4)
    assert h.items.tolist() == [[0, 0, 10, 11], [0, 0, 0, 30], [0, 40, 41, 42]]


def test_training_windows_make_every_event_but_the_first_a_target_exactly_once() -> None:
    n, max_len = 12, 5
    seq = table([(7, 100 + k, k + 1) for k in range(n)] + [(8, 999, 50)]).per_user_sequences()
    w = training_windows(seq, max_len)
    assert w.items.shape == (3, max_len + 1)  # ceil(11 / 5) windows for user 7, none for user 8
    targets = w.items[:, 1:][w.valid[:, 1:] & w.valid[:, :-1]]
    assert sorted(targets.tolist()) == list(range(101, 100 + n))
    assert w.items[0].tolist() == list(range(106, 112))  # windows are cut from the end
    assert 999 not in w.items


# -- protocols ----------------------------------------------------------------------------------


def test_full_protocol_excludes_seen_items_but_never_the_target() -> None:
    catalog = Catalog(torch.tensor([10, 20, 30, 40, 50]))
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]] * 3)
    targets = torch.tensor([40, 40, 99])
    owner = torch.tensor([0, 0, 1, 1, 2])
    seen = torch.tensor([10, 20, 40, 77, 10])  # row 1 has seen its own target; 77 has no row
    ranks = full_ranks(scores, catalog, targets, owner, seen)
    assert ranks.tolist() == [1, 3, MISS]  # 30 above 40 for row 0; 99 cannot be ranked


def test_full_protocol_excludes_the_whole_training_history_not_only_the_window() -> None:
    # User 1 trained on items 1..6 and holds out 7; a scorer that likes low ids ranks 7 first
    # once every training item is excluded, although the history window holds only 2 events.
    t = table([(1, i, i) for i in range(1, 8)] + [(2, 8, 9), (2, 9, 10)])
    split = leave_one_out(t)

    class LowIdsFirst:
        catalog = Catalog(torch.arange(1, 10))

        def scores(self, histories: Histories) -> torch.Tensor:
            return -self.catalog.keys.float()[None, :].expand(len(histories), -1)

    ranks = rank_users(LowIdsFirst(), split, recent_histories(split, 2), "full")
    assert split.target.tolist() == [7, 9]
    assert ranks.tolist() == [0, 7]  # user 2: items 1..7 score above 9; only 8 (seen) is excluded


def sampled_split() -> tuple:
    rng = np.random.default_rng(5)
    events = []
    for user in range(1, 41):
        items = rng.choice(np.arange(1, 301), size=rng.integers(2, 30), replace=False)
        events += [(user, int(i), 0) for i in items]
    events.append((41, 1, 0))
    events += [(42, i, 0) for i in range(1, 251)]  # only 50 unseen items: fewer than 100
    events.sort(key=lambda e: e[2])
    return leave_one_out(table([(u, i, k) for k, (u, i, _) in enumerate(events)]))


def test_sampled_candidates_exclude_the_users_items_and_hold_the_target_once() -> None:
    split = sampled_split()
    cands, valid = sample_negatives(split, 100, seed=3)
    assert cands.shape == (len(split), 101)
    all_seq = split.all_seq
    universe = set(all_seq.item_id.tolist())
    for u, user in enumerate(split.users.tolist()):
        r = int(np.searchsorted(all_seq.user_id, user))
        mine = set(all_seq.item_id[all_seq.indptr[r]:all_seq.indptr[r + 1]].tolist())
        negs = cands[u, 1:][valid[u, 1:]].tolist()
        assert cands[u, 0] == split.target[u] and valid[u, 0]
        assert not mine & set(negs)
        assert len(set(negs)) == len(negs)
        assert cands[u].tolist().count(split.target[u]) == 1
        assert len(negs) == min(100, len(universe - mine))
    assert valid[:-1].all() and valid[-1].sum() < 1 + 100  # user 42 has fewer than 100 unseen items


def test_sampled_candidates_are_seeded() -> None:
    split = sampled_split()
    first = sample_negatives(split, 100, seed=3)
    assert np.array_equal(first[0], sample_negatives(split, 100, seed=3)[0])
    assert not np.array_equal(first[0], sample_negatives(split, 100, seed=4)[0])


def test_sampled_ranks_count_only_valid_candidates_with_a_row() -> None:
    catalog = Catalog(torch.tensor([1, 2, 3, 4]))
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.7]] * 3)
    cands = torch.tensor([[1, 2, 3, 9], [4, 2, 3, 1], [9, 1, 2, 3]])
    valid = torch.tensor([[True, True, False, True], [True, True, True, True], [True] * 4])
    assert sampled_ranks(scores, catalog, cands, valid).tolist() == [1, 2, MISS]


# -- popularity, by hand ----------------------------------------------------------------------------


def test_popularity_matches_a_hand_computed_example() -> None:
    # Training counts: A 4, B 2, C 1, D 1, E 1; held out: u1 C, u2 B, u3 C, u4 F (never trained).
    events = [(1, A), (2, A), (3, A), (4, A), (1, B), (2, C), (3, B), (3, D), (4, E),
              (1, C), (2, B), (3, C), (4, F)]
    split = leave_one_out(table([(u, i, k) for k, (u, i) in enumerate(events)]))
    ranks = rank_users(PopularityScorer(split.train), split, recent_histories(split, 5), "full")
    # u1 sees A, B: D and E tie with C (ties count against it) -> 2; u2 sees A, C: B beats D, E -> 0;
    # u3 sees A, B, D: E ties with C -> 1; u4: F has no count -> miss.
    assert ranks.tolist() == [2, 0, 1, MISS]
    got = metrics(ranks)
    expected = {"HR@1": 1 / 4, "HR@5": 3 / 4, "HR@10": 3 / 4,
                "NDCG@5": (1 / math.log2(4) + 1 + 1 / math.log2(3)) / 4,
                "NDCG@10": (1 / math.log2(4) + 1 + 1 / math.log2(3)) / 4,
                "MRR": (1 / 3 + 1 + 1 / 2 + 1 / (MISS + 1)) / 4}
    assert got == pytest.approx(expected, abs=1e-6)


# -- end to end ---------------------------------------------------------------------------------


def tiny_config() -> LiverecConfig:
    base = LiverecConfig()
    return dataclasses.replace(
        base, model=ModelConfig(encoder=EncoderConfig(dim=16, layers=1, heads=1, max_len=10)),
        trainer=dataclasses.replace(base.trainer, negatives=32, batch_events=64))


def write_sequence_file(t: EventTable, path: Path) -> None:
    lines = [f"{u} {i} {ms / 1000:.3f}" for u, i, ms in zip(t.user_id.tolist(), t.item_id.tolist(),
                                                            t.event_time_ms.tolist())]
    path.write_text("\n".join(lines) + "\n")


def random_ndcg10_full(split, catalog_size: int) -> float:
    """Expected NDCG@10 of a uniformly random ranking under the full protocol."""
    total = 0.0
    for u, row in enumerate(split.rows.tolist()):
        seen = set(split.train_seq.item_id[split.train_seq.indptr[row]:split.train_seq.indptr[row + 1]].tolist())
        n = catalog_size - len(seen - {int(split.target[u])})
        total += sum(1 / math.log2(r + 2) for r in range(min(10, n))) / n
    return total / len(split)


def test_cli_rejects_an_offline_dropout_outside_0_1() -> None:
    assert main(["--dataset", "synthetic", "--offline-dropout", "1.0", "--quiet"], tiny_config()) == 2


def test_cli_rejects_a_bad_offline_item_optimizer_or_lr() -> None:
    assert main(["--dataset", "synthetic", "--offline-item-lr", "0", "--quiet"], tiny_config()) == 2
    with pytest.raises(SystemExit) as exc:
        main(["--dataset", "synthetic", "--offline-item-optimizer", "lion", "--quiet"], tiny_config())
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="offline item optimizer"):
        OfflineOptions(item_optimizer="lion")


@pytest.mark.parametrize("optimizer, lr", [("adagrad", 0.1), ("sgd", 0.05)])
def test_the_offline_twin_trains_its_item_table_with_its_own_optimizer(optimizer: str, lr: float) -> None:
    """The online learner's item optimizer (Adam here) is not the offline twin's."""
    t = synthetic(SyntheticConfig(num_users=30, num_items=40, num_events=600, num_clusters=3, seed=2))
    base = tiny_config()
    config = dataclasses.replace(base, trainer=dataclasses.replace(base.trainer, item_optimizer="adam", item_lr=2e-3))
    scorer = train_offline(t, config, seed=0, options=OfflineOptions(epochs=1, item_optimizer=optimizer, item_lr=lr))
    (table,) = scorer.store.configs
    assert (table.optimizer, table.lr) == (optimizer, lr)
    assert table.dim == config.model.encoder.dim


def test_end_to_end_on_a_small_synthetic_stream(tmp_path: Path) -> None:
    t = synthetic(SyntheticConfig(num_users=200, num_items=150, num_events=4000, num_clusters=5, seed=1))
    data = tmp_path / "small.txt"
    write_sequence_file(t, data)
    out = tmp_path / "results" / "quality.json"
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        code = main(["--dataset", str(data), "--format", "sequence", "--protocol", "all", "--epochs", "2",
                     "--batch-windows", "32", "--seed", "0", "--json", "--quiet", "--out", str(out)], tiny_config())
    assert code == 0
    report = json.loads(stdout.getvalue())
    assert json.loads(out.read_text()) == report
    assert report["dataset"]["events"] == len(t)

    for protocol in ("full", "sampled100"):
        models = report["protocols"][protocol]["models"]
        assert sorted(models) == sorted(MODELS)
        for name in MODELS:
            values = models[name]
            assert sorted(values) == sorted(METRICS)
            assert all(0.0 <= v <= 1.0 for v in values.values()), (protocol, name, values)
            assert values["HR@10"] >= values["NDCG@10"] and values["HR@10"] >= values["HR@5"] >= values["HR@1"]
        assert set(report["protocols"][protocol]["ratios"]) == {"online/offline", "online/popularity",
                                                               "offline/popularity"}

    split = leave_one_out(t)
    random_full = random_ndcg10_full(split, len(np.unique(split.train.item_id)))
    random_sampled_hr10 = 10 / 101
    for name in ("online", "offline"):
        assert report["protocols"]["full"]["models"][name]["NDCG@10"] > 2 * random_full, name
        assert report["protocols"]["sampled100"]["models"][name]["HR@10"] > 2 * random_sampled_hr10, name
    # The stream's clusters make the next item predictable from the history: one streaming pass
    # (exact softmax, whole windows, replay) must beat item counts, finally and prequentially.
    full = report["protocols"]["full"]["models"]
    assert full["online"]["NDCG@10"] > 1.3 * full["popularity"]["NDCG@10"], full
    preq = report["prequential"]
    assert 0 < preq["scored"] <= report["dataset"]["train_events"]
    assert 0.0 <= preq["online"]["NDCG@10"] <= preq["online"]["HR@10"] <= 1.0
    assert preq["online"]["NDCG@10"] > preq["popularity"]["NDCG@10"], preq
    assert report["online_events_per_s"] > 0
    assert report["setup"]["trainer"]["replay_users"] == tiny_config().trainer.replay_users

    text = format_table(report)
    for needle in ("full", "sampled100", *MODELS, *METRICS, "online/offline", "prequential"):
        assert needle in text


def test_seeds_parse_lists_and_ranges_and_refuse_anything_else() -> None:
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    assert parse_seeds("3, 3,1-3") == [3, 1, 2]
    for bad in ("a", "4-2", "1-", "-1", ""):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)
    assert main(["--dataset", "synthetic", "--seeds", "2-1", "--quiet"], tiny_config()) == 2
    with pytest.raises(SystemExit):
        main(["--dataset", "synthetic", "--seed", "1", "--seeds", "0-1", "--quiet"], tiny_config())


def fake_run(online: float, offline: float, popularity: float) -> dict:
    """A one-protocol report whose every metric of a model has the given value."""
    values = {"online": online, "offline": offline, "popularity": popularity}
    models = {name: {m: v for m in METRICS} for name, v in values.items()}
    r = {"online/offline": online / offline, "online/popularity": online / popularity,
         "offline/popularity": offline / popularity}
    met = {"online/offline": r["online/offline"] >= 0.95, "online/popularity": r["online/popularity"] >= 2.0,
           "offline/popularity": r["offline/popularity"] >= 2.0}
    return {"protocols": {"full": {"models": models, "ratios": r, "targets_met": met}}}


def test_seed_summary_is_the_mean_and_sd_and_the_ratio_of_the_means() -> None:
    # Seed 0 meets online/offline (0.96), seed 1 misses it (0.90); the means (0.093 / 0.100) miss too,
    # while each seed's ratio to popularity (0.04) is at least 2.
    summary = summarize_seeds([fake_run(0.096, 0.100, 0.04), fake_run(0.090, 0.100, 0.04)])["full"]
    ndcg = summary["models"]["online"]["NDCG@10"]
    assert ndcg["mean"] == pytest.approx(0.093) and ndcg["sd"] == pytest.approx(math.sqrt(2) * 0.003)
    assert summary["models"]["offline"]["NDCG@10"] == {"mean": pytest.approx(0.1), "sd": 0.0}
    assert summary["ratios_of_means"]["online/offline"] == pytest.approx(0.93)
    assert summary["ratios_of_means"]["online/popularity"] == pytest.approx(0.093 / 0.04)
    assert summary["targets_met"] == {"online/offline": False, "online/popularity": True, "offline/popularity": True}
    assert summary["seeds_meeting_target"] == {"online/offline": 1, "online/popularity": 2, "offline/popularity": 2}
    assert [r["online/offline"] for r in summary["per_seed_ratios"]] == pytest.approx([0.96, 0.90])


def test_several_seeds_end_to_end_retrain_every_model_per_seed(tmp_path: Path) -> None:
    t = synthetic(SyntheticConfig(num_users=120, num_items=80, num_events=1500, num_clusters=4, seed=2))
    data = tmp_path / "small.txt"
    write_sequence_file(t, data)
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        code = main(["--dataset", str(data), "--format", "sequence", "--epochs", "1", "--seeds", "0,1",
                     "--json", "--quiet"], tiny_config())
    assert code == 0
    report = json.loads(stdout.getvalue())
    assert report["seeds"] == [0, 1] and [run["setup"]["seed"] for run in report["runs"]] == [0, 1]
    online = [run["protocols"]["full"]["models"]["online"]["NDCG@10"] for run in report["runs"]]
    assert online[0] != online[1]  # a different seed trains a different model
    summary = report["summary"]["full"]
    assert summary["models"]["online"]["NDCG@10"]["mean"] == pytest.approx(sum(online) / 2)
    assert summary["per_seed_ratios"] == [run["protocols"]["full"]["ratios"] for run in report["runs"]]
