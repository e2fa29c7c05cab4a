"""End to end: the recommender learns a deterministic successor pattern on CPU in seconds.

A plain `nn.Embedding` stands in for the embedding store: the trainer's contract is the same
(look rows up with autograd, call the model, backward, step).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from liverec.model import EncoderConfig, ModelConfig, SequentialRecommender, TrainBatch
from liverec.model.metrics import hit_rate, target_ranks

ITEMS, LENGTH, NEGS = 40, 10, 16


def successor_windows(b: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of LENGTH + 1 consecutive items: item i is always followed by item i + 1."""
    start = torch.randint(0, ITEMS, (b, 1), generator=gen)
    return (start + torch.arange(LENGTH + 1)) % ITEMS


def test_learns_successor_pattern() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    config = ModelConfig(encoder=EncoderConfig(dim=32, layers=2, heads=2, max_len=LENGTH, dropout=0.1))
    model = SequentialRecommender(config)
    table = nn.Embedding(ITEMS, 32)
    opt = torch.optim.Adam([*model.parameters(), *table.parameters()], lr=3e-3)
    log_q = -math.log(ITEMS)  # every item is equally frequent here
    for _ in range(120):
        ids = successor_windows(32, gen)
        neg_ids = torch.randint(0, ITEMS, (NEGS,), generator=gen)
        batch = TrainBatch(
            item_emb=table(ids),
            item_ids=ids,
            actions=torch.ones_like(ids),
            valid=torch.ones_like(ids, dtype=torch.bool),
            log_q=torch.full(ids.shape, log_q),
            neg_emb=table(neg_ids),
            neg_ids=neg_ids,
            log_q_neg=torch.full((NEGS,), log_q),
        )
        losses = model(batch)
        opt.zero_grad()
        losses.total.backward()
        opt.step()

    model.eval()
    with torch.no_grad():
        ids = successor_windows(64, gen)
        history, target = ids[:, :-1], ids[:, -1]
        cache = model.encode(table(history), torch.ones_like(history))
        user = model.user_hidden(cache)
        side = model.item_side(table.weight)
        retrieval = model.retrieval_scores(user, side.retrieval)
        ranking = model.ranking_scores(cache, user, side.ranking.expand(64, ITEMS, -1))
    assert hit_rate(target_ranks(retrieval, target), 10).mean() > 0.95
    assert hit_rate(target_ranks(ranking, target), 10).mean() > 0.95


def test_full_catalog_batch_ignores_in_batch_negatives() -> None:
    """With the whole catalog as negatives the softmax is exact; the config's in-batch
    negatives would only add a biased second estimate, so the model leaves them out."""
    gen = torch.Generator().manual_seed(3)
    table = nn.Embedding(ITEMS, 32)
    ids = successor_windows(8, gen)
    neg_ids = torch.randperm(ITEMS, generator=gen)
    losses = []
    for in_batch in (True, False):
        torch.manual_seed(0)
        config = ModelConfig(encoder=EncoderConfig(dim=32, layers=1, heads=2, max_len=LENGTH, dropout=0.0),
                             in_batch_negatives=in_batch)
        model = SequentialRecommender(config)
        batch = TrainBatch(item_emb=table(ids), item_ids=ids, actions=torch.ones_like(ids),
                           valid=torch.ones_like(ids, dtype=torch.bool), log_q=torch.zeros(ids.shape),
                           neg_emb=table(neg_ids), neg_ids=neg_ids, log_q_neg=torch.full((ITEMS,), -math.log(ITEMS)),
                           full_catalog=True)
        losses.append(model(batch).retrieval)
    torch.testing.assert_close(losses[0], losses[1])
