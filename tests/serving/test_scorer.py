"""The batched scorer against a per-query reference computed straight from the model.

A batch mixes what a replica's queue mixes: full-catalog queries with and without exclusions,
candidate lists of different lengths (with unknown and excluded ids), k above what is left, and
users without state. Every answer must equal the one its query gets when the model scores it
alone, the simple way: eagerly and through the full-catalog graphs' static-shape pass (captured
as CUDA graphs on a GPU, run eagerly on a CPU), also across parameter versions that the graphs'
static buffers take in turn and a catalog that outgrows them.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from liverec.serving.backend import (
    ITEM_TABLE,
    Answer,
    HistoryStateSource,
    ModelSnapshot,
    Query,
    Scorer,
)
from liverec.serving.params import ParamsVersion
from tests.serving.service_harness import (
    COLD_USER,
    HISTORIES,
    N_ITEMS,
    NOW_MS,
    make_snapshot,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def on(snapshot: ModelSnapshot, device: str) -> ModelSnapshot:
    """The same snapshot with every tensor and the model moved to `device`."""
    if device == "cpu":
        return snapshot
    return ModelSnapshot(snapshot.version, snapshot.event_time_ms, snapshot.model.to(device), *(
        t.to(device) for t in (snapshot.item_keys, snapshot.item_rows, snapshot.retrieval_rows, snapshot.ranking_rows,
                               snapshot.popular)), torch.device(device))


@torch.no_grad()
def reference(snapshot: ModelSnapshot, q: Query) -> tuple[list[int], np.ndarray]:
    """One query alone: encode the history, score, drop banned items, sort."""
    items, actions, _offset, _time = HISTORIES[q.user_id]
    keys = snapshot.item_keys.cpu().numpy()
    cols = np.searchsorted(keys, items)
    emb = snapshot.item_rows[torch.from_numpy(cols).to(snapshot.device)]
    cache = snapshot.model.encode(emb[None], torch.from_numpy(actions.astype(np.int64)).to(snapshot.device)[None])
    hidden = snapshot.model.user_hidden(cache)
    banned = set(q.exclude.tolist() if q.exclude is not None else []) | (set(items.tolist()) if q.exclude_seen else set())
    if q.candidates is None:
        scores = snapshot.model.retrieval_scores(hidden, snapshot.retrieval_rows)[0].cpu().numpy()
        ranked = [(float(s), int(k)) for s, k in zip(scores, keys) if int(k) not in banned]
    else:
        cand = [int(c) for c in q.candidates if int(c) in set(keys.tolist()) and int(c) not in banned]
        rows = snapshot.ranking_rows[torch.from_numpy(np.searchsorted(keys, cand)).to(snapshot.device)]
        scores = snapshot.model.ranking_scores(cache, hidden, rows[None])[0].cpu().numpy()
        ranked = list(zip(scores.tolist(), cand))
    ranked.sort(key=lambda p: -p[0])
    top = ranked[: q.k]
    return [k for _, k in top], np.array([s for s, _ in top], np.float32)


QUERIES = [
    Query(1, 5),
    Query(2, 10, exclude_seen=True),
    Query(COLD_USER, 4),
    Query(3, 7, exclude=np.array([1, 2, 3, 999_999]), exclude_seen=True),
    Query(1, 3, candidates=np.array([5, 17, 20, 21, 22, 23, 999_999]), exclude=np.array([21])),
    Query(3, 50, candidates=np.array([30, 31, 32]), exclude_seen=True),
    Query(2, 2, candidates=np.array([7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]), exclude_seen=True),
    Query(1, N_ITEMS + 50, exclude_seen=True),
    Query(COLD_USER, 3, candidates=np.array([40, 10, 30])),
]


def check(snapshot: ModelSnapshot, queries: list[Query], answers: list[Answer]) -> None:
    """Every answer is its query's reference answer under `snapshot`."""
    assert len(answers) == len(queries)
    for q, a in zip(queries, answers):
        assert isinstance(a, Answer) and a.model_version == snapshot.version
        if q.user_id == COLD_USER:
            assert a.cold_start and a.state_version == -1
            continue
        items, scores = reference(snapshot, q)
        assert not a.cold_start and a.state_version == HISTORIES[q.user_id][2]
        assert a.items.tolist() == items, q
        np.testing.assert_allclose(a.scores, scores, rtol=1e-4, atol=1e-5)


def other_version(items: int, seed: int, version: int) -> ModelSnapshot:
    """A snapshot of the harness's model shape with other weights and `items` catalog rows."""
    base = make_snapshot()
    torch.manual_seed(seed)
    model = type(base.model)(base.model.config)
    rng = np.random.default_rng(seed)
    dim = base.model.config.encoder.dim
    rows = {ITEM_TABLE: {k: (rng.standard_normal(dim).astype(np.float32), 1000 - k) for k in range(1, items + 1)}}
    return ModelSnapshot.build(ParamsVersion(version, NOW_MS, base.model.config, model.state_dict(), rows), "cpu")


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_a_mixed_batch_answers_each_query_as_if_alone(device: str, graphs: bool) -> None:
    snapshot = on(make_snapshot(), device)
    check(snapshot, QUERIES, Scorer(HistoryStateSource(HISTORIES), graphs=graphs).recommend(snapshot, QUERIES))


@pytest.mark.parametrize("device", DEVICES)
def test_graphs_take_each_batch_s_version_and_a_grown_catalog(device: str) -> None:
    """One scorer, batches alternating between versions (the static buffers are reloaded each
    time), exclusions in one batch cleared before the next, then a catalog too big for them."""
    scorer = Scorer(HistoryStateSource(HISTORIES), graphs=True)
    a, b = on(make_snapshot(), device), on(other_version(N_ITEMS, 1, 8), device)
    scorer.warm(a, batch=4)
    banned = [Query(1, 5, exclude=np.array([1, 2, 3]), exclude_seen=True), Query(2, 20, exclude_seen=True),
              Query(3, 4, exclude=np.array([250, 999_999]))]
    plain = [Query(1, N_ITEMS), Query(2, 20), Query(3, 3)]  # every item of user 1: a stale ban would show
    for snapshot, queries in [(a, banned), (b, plain), (a, plain), (b, banned), (b, plain)]:
        check(snapshot, queries, scorer.recommend(snapshot, queries))
    grown = on(other_version(4 * N_ITEMS, 2, 9), device)  # past the buffers' spare room: new graphs
    check(grown, QUERIES, scorer.recommend(grown, QUERIES))
    check(a, plain, scorer.recommend(a, plain))


def test_graphs_captured_from_several_threads_at_once_answer_right(device: str = "cpu") -> None:
    """A replica captures from two threads (parameter thread: a grown catalog's graphs; batcher: a
    batch size on first use); on CUDA two captures at once used to fail."""
    snapshots = [on(other_version(N_ITEMS * (i + 1), i, i + 1), device) for i in range(4)]
    scorers = [Scorer(HistoryStateSource(HISTORIES), graphs=True) for _ in snapshots]
    errors: list[BaseException] = []

    def capture_and_answer(scorer: Scorer, snapshot: ModelSnapshot) -> None:
        try:
            scorer.warm(snapshot, batch=8)
            check(snapshot, QUERIES, scorer.recommend(snapshot, QUERIES))
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(error)

    threads = [threading.Thread(target=capture_and_answer, args=pair) for pair in zip(scorers, snapshots, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_k_beyond_what_is_left_returns_every_remaining_item_once() -> None:
    snapshot = make_snapshot()
    q = Query(1, N_ITEMS + 50, exclude_seen=True)
    (a,) = Scorer(HistoryStateSource(HISTORIES)).recommend(snapshot, [q])
    seen = set(HISTORIES[1][0].tolist())
    assert len(a.items) == N_ITEMS - len(seen)
    assert len(set(a.items.tolist())) == len(a.items) and not seen & set(a.items.tolist())
    assert np.all(np.diff(a.scores) <= 0)


def test_every_candidate_excluded_gives_an_empty_answer_not_a_cold_start() -> None:
    snapshot = make_snapshot()
    q = Query(2, 5, candidates=np.array([7, 8, 9]), exclude_seen=True)
    (a,) = Scorer(HistoryStateSource(HISTORIES)).recommend(snapshot, [q])
    assert a.items.tolist() == [] and not a.cold_start
