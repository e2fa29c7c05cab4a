"""Ranking metrics against hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from liverec.model.metrics import hit_rate, ndcg, reciprocal_rank, seen_mask, summarize, target_ranks


def test_ranks_hits_ndcg_mrr_by_hand() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1], [0.0, 0.1, 0.2, 0.3]])
    targets = torch.tensor([2, 0, 0])
    ranks = target_ranks(scores, targets)
    assert ranks.tolist() == [1, 0, 3]
    assert hit_rate(ranks, 1).tolist() == [0.0, 1.0, 0.0]
    assert hit_rate(ranks, 2).tolist() == [1.0, 1.0, 0.0]
    assert ndcg(ranks, 2).tolist() == pytest.approx([1 / math.log2(3), 1.0, 0.0])
    assert ndcg(ranks, 10).tolist() == pytest.approx([1 / math.log2(3), 1.0, 1 / math.log2(5)])
    assert reciprocal_rank(ranks).tolist() == pytest.approx([0.5, 1.0, 0.25])
    summary = summarize(ranks, ks=(1, 2))
    assert summary == pytest.approx(
        {"HR@1": 1 / 3, "NDCG@1": 1 / 3, "HR@2": 2 / 3, "NDCG@2": (1 / math.log2(3) + 1) / 3, "MRR": 1.75 / 3}
    )


def test_excluded_items_do_not_compete() -> None:
    """Full-catalog leave-one-out: items the user has seen are dropped, but never the target."""
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8]])
    exclude = torch.tensor([[False, True, True, False, True]])  # the target (2) is "seen" too
    assert target_ranks(scores, torch.tensor([2]), exclude).tolist() == [0]
    assert target_ranks(scores, torch.tensor([0]), exclude).tolist() == [1]  # only item 3 competes


def test_ties_count_against_the_target_and_nan_ranks_last() -> None:
    assert target_ranks(torch.zeros(1, 5), torch.tensor([3])).tolist() == [4]
    scores = torch.tensor([[float("nan"), 0.2, -5.0], [1.0, float("nan"), 0.5]])
    assert target_ranks(scores, torch.tensor([0, 2])).tolist() == [2, 1]


def test_sampled_protocol_target_in_column_zero() -> None:
    """SASRec protocol: the held-out item's score first, then 100 sampled negatives."""
    scores = torch.cat((torch.tensor([[0.5], [0.5]]), torch.linspace(0, 1, 100).expand(2, 100)), 1)
    assert target_ranks(scores, torch.zeros(2, dtype=torch.long)).tolist() == [50, 50]


def test_seen_mask_with_padding_and_repeats() -> None:
    history = torch.tensor([[0, 3, 3, 1], [2, 0, 0, 0]])
    valid = torch.tensor([[False, True, True, True], [True, False, False, False]])
    mask = seen_mask(history, valid, 5)
    assert mask.tolist() == [[False, True, False, True, False], [False, False, True, False, False]]
