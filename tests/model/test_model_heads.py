"""Scoring heads and the recommender: item-side precompute, serving path == training path."""

from __future__ import annotations

import math

import torch

from liverec.model import EncoderConfig, KVCache, ModelConfig, RetrievalHead, SequentialRecommender, TrainBatch

CFG = ModelConfig(encoder=EncoderConfig(dim=16, layers=2, heads=2, max_len=10, dropout=0.0), rank_negatives=4)
TOL = {"atol": 2e-5, "rtol": 1e-4}


def make_model(device: torch.device) -> SequentialRecommender:
    torch.manual_seed(0)
    return SequentialRecommender(CFG).to(device).eval()


def make_batch(
    device: torch.device, b: int = 4, length: int = 8, items: int = 30, negs: int = 6
) -> tuple[TrainBatch, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(items, 16, generator=gen).to(device).requires_grad_()
    ids = torch.randint(0, items, (b, length + 1), generator=gen).to(device)
    valid = torch.ones(b, length + 1, dtype=torch.bool, device=device)
    valid[0, :3] = False
    neg_ids = torch.randint(0, items, (negs,), generator=gen).to(device)
    batch = TrainBatch(
        item_emb=table[ids],
        item_ids=ids,
        actions=torch.randint(0, 6, (b, length + 1), generator=gen).to(device),
        valid=valid,
        log_q=torch.full((b, length + 1), -math.log(items), device=device),
        neg_emb=table[neg_ids],
        neg_ids=neg_ids,
        log_q_neg=torch.full((negs,), -math.log(items), device=device),
    )
    return batch, table


def test_retrieval_head(device: torch.device) -> None:
    head = RetrievalHead(16).to(device)
    hidden = torch.randn(3, 16, device=device)
    table = torch.randn(20, 16, device=device)
    table[7] = 0.0  # an unadmitted item reads zeros from the store
    rows = head.item_side(table)
    scores = head.score_all(head.user_side(hidden), rows)
    assert scores.shape == (3, 20)
    torch.testing.assert_close(rows.norm(dim=-1)[torch.arange(20) != 7], torch.ones(19, device=device))
    assert (scores[:, 7] == 0).all() and scores.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(scores, head.user_side(hidden) @ head.item_side(table).T)


def test_item_side_is_per_item(device: torch.device) -> None:
    """Rows precomputed for the whole table and gathered by id equal rows computed per request."""
    model = make_model(device)
    table = torch.randn(25, 16, device=device)
    side = model.item_side(table)
    assert side.retrieval.shape == (25, 16) and side.ranking.shape == (25, 32)
    ids = torch.tensor([[3, 9], [24, 0]], device=device)
    torch.testing.assert_close(side.ranking[ids], model.ranker.item_side(table[ids]))


def test_serving_scores_equal_training_scores(device: torch.device) -> None:
    """What training computes for the target after slot t (the candidates attend over slots
    <= t of the full pass) equals what serving computes from a cache of events 0..t alone."""
    model = make_model(device)
    batch, table = make_batch(device)
    hist, actions, hist_valid = batch.item_emb[:, :-1], batch.actions[:, :-1], batch.valid[:, :-1]
    out = model.encoder(hist, actions, hist_valid)
    cands = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 5, 9]], device=device)
    rows = model.ranker.item_side(table[cands]).detach()
    t = 4  # row 0 is left-padded by 3: two events so far
    k, v = out.kv.layers[-1]
    key_mask = hist_valid & (torch.arange(hist.shape[1], device=device) <= t)
    train_logits = model.ranker(rows, out.query_pos[:, t], k, v, key_mask, out.query_hidden[:, t])

    cache = model.encode(hist[:, : t + 1], actions[:, : t + 1], hist_valid[:, : t + 1])
    user = model.user_hidden(cache)
    torch.testing.assert_close(user, out.query_hidden[:, t], **TOL)
    torch.testing.assert_close(model.ranking_scores(cache, user, rows), train_logits, **TOL)
    side = model.item_side(table)
    expected = model.retrieval.user_side(out.query_hidden[:, t]) @ side.retrieval.T
    torch.testing.assert_close(model.retrieval_scores(user, side.retrieval), expected, **TOL)


def test_cold_start_scores_are_finite(device: torch.device) -> None:
    model = make_model(device)
    cache = KVCache.empty(CFG.encoder, 2, device)
    user = model.user_hidden(cache)
    side = model.item_side(torch.randn(10, 16, device=device))
    assert torch.isfinite(model.retrieval_scores(user, side.retrieval)).all()
    assert torch.isfinite(model.ranking_scores(cache, user, side.ranking[:4].expand(2, 4, 32))).all()


def test_ranking_reads_the_history(device: torch.device) -> None:
    model = make_model(device)
    batch, table = make_batch(device)
    rows = model.ranker.item_side(table[:5]).detach().expand(4, 5, 32)
    scores = []
    for emb in (batch.item_emb, batch.item_emb.flip(1)):
        cache = model.encode(emb[:, :-1], batch.actions[:, :-1])
        scores.append(model.ranking_scores(cache, model.user_hidden(cache), rows))
    assert (scores[0] - scores[1]).abs().max() > 1e-4


def test_training_step_reaches_every_input(device: torch.device) -> None:
    """Losses are finite and their gradient reaches the item table (history, positives and
    negatives: the store's sparse update) and every dense parameter."""
    model = make_model(device).train()
    batch, table = make_batch(device)
    losses = model(batch)
    assert all(torch.isfinite(x) and x > 0 for x in losses)
    torch.testing.assert_close(losses.total, losses.retrieval + CFG.rank_weight * losses.ranking)
    losses.total.backward()
    touched = torch.cat((batch.item_ids[batch.valid], batch.neg_ids)).unique()  # padding gets none
    assert (table.grad[touched].abs().sum(1) > 0).all()
    untouched = torch.ones(table.shape[0], dtype=torch.bool, device=device)
    untouched[touched] = False
    assert (table.grad[untouched] == 0).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_loss_mask_selects_targets(device: torch.device) -> None:
    """Only selected targets count: online training scores just the new events."""
    model = make_model(device)
    batch, _ = make_batch(device)
    only_last = torch.zeros(4, 8, dtype=torch.bool, device=device)
    only_last[:, -1] = True
    masked = model(TrainBatch(**{**batch.__dict__, "loss_mask": only_last}))
    none = model(TrainBatch(**{**batch.__dict__, "loss_mask": torch.zeros_like(only_last)}))
    assert masked.total != model(batch).total
    assert none.total == 0 and none.total.requires_grad
