"""Losses: logQ correction, accidental-hit masking, numerical safety, the ranking loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from liverec.model import bce_ranking_loss, sampled_softmax_loss


def reference_loss(u, p, pos_ids, n, neg_ids, lq_pos, lq_neg, temperature):
    """The documented estimator, one row and one column at a time."""
    rows, total = u.shape[0], 0.0
    sources = (1 if len(n) else 0) + (1 if rows > 1 else 0)
    for i in range(rows):
        pos = float(u[i] @ p[i]) / temperature
        terms = [pos]
        for j in range(len(n)):
            if neg_ids[j] != pos_ids[i]:
                terms.append(float(u[i] @ n[j]) / temperature - lq_neg[j] - math.log(len(n)) - math.log(sources))
        for j in range(rows):
            if pos_ids[j] != pos_ids[i]:
                terms.append(float(u[i] @ p[j]) / temperature - lq_pos[j] - math.log(rows - 1) - math.log(sources))
        total += math.log(sum(math.exp(t) for t in terms)) - pos
    return total / rows


def test_matches_reference_with_collisions() -> None:
    """Rows 0 and 1 share their target: neither is the other's negative; the uniform negative
    equal to that target is masked for them too."""
    gen = torch.Generator().manual_seed(0)
    u, p, n = (F.normalize(torch.randn(s, 4, generator=gen), dim=-1) for s in (4, 4, 3))
    neg_ids = torch.tensor([5, 11, 12])
    lq_pos = torch.tensor([-2.0, -2.0, -3.0, -4.0])
    lq_neg = torch.full((3,), -math.log(100))
    got = []
    for pos_ids in (torch.tensor([5, 5, 7, 9]), torch.tensor([5, 6, 7, 9])):
        got.append(sampled_softmax_loss(u, p, pos_ids, n, neg_ids, lq_pos, lq_neg, temperature=0.5).item())
        want = reference_loss(u, p, pos_ids.tolist(), n, neg_ids.tolist(), lq_pos.tolist(), lq_neg.tolist(), 0.5)
        assert abs(got[-1] - want) < 1e-5
    assert abs(got[0] - got[1]) > 1e-3  # the masking is not a no-op


def test_without_in_batch_uniform_only() -> None:
    gen = torch.Generator().manual_seed(1)
    u, p, n = (torch.randn(s, 4, generator=gen) for s in (3, 3, 5))
    ids, neg_ids = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7, 8])
    lq_neg = torch.full((5,), -math.log(50))
    got = sampled_softmax_loss(u, p, ids, n, neg_ids, torch.zeros(3), lq_neg, in_batch=False)
    logits = torch.cat(((u * p).sum(1, keepdim=True), u @ n.T + math.log(50) - math.log(5)), 1)
    torch.testing.assert_close(got, F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)))


def test_logq_lowers_the_penalty_of_popular_negatives() -> None:
    """The more often an item is drawn as a negative (higher log q), the less one draw of it
    counts: the loss and the push against it both shrink."""
    gen = torch.Generator().manual_seed(2)
    u, p = (F.normalize(torch.randn(3, 8, generator=gen), dim=-1) for _ in range(2))
    ids = torch.tensor([0, 1, 2])
    empty, no_ids = torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)
    losses, pushes = [], []
    for log_q_item2 in (-6.0, -3.0, -1.0):
        p_ = p.clone().requires_grad_()
        lq = torch.tensor([-3.0, -3.0, log_q_item2])
        loss = sampled_softmax_loss(u, p_, ids, empty, no_ids, lq, torch.zeros(0), temperature=0.1)
        loss.backward()
        losses.append(loss.item())
        # Gradient descent moves item 2 against this: how hard rows 0 and 1 push it away (row 2's
        # own positive term adds the same amount in every setting: log q_2 is masked in row 2).
        pushes.append(float(u[:2].sum(0) @ p_.grad[2]))
    assert losses[0] > losses[1] > losses[2]
    assert pushes[0] > pushes[1] > pushes[2]


def test_logq_removes_popularity_bias_of_in_batch_negatives() -> None:
    """One context, targets drawn from a Zipf distribution, in-batch negatives only. The best
    scores are log p + c. Uncorrected, popular items are over-sampled as negatives and the
    learned scores come out flat; with logQ they recover log p."""
    probs = 1.0 / torch.arange(1, 11, dtype=torch.float)
    probs /= probs.sum()
    user = torch.ones(256, 1)

    def fit(corrected: bool) -> torch.Tensor:
        gen = torch.Generator().manual_seed(3)
        scores = torch.zeros(10, 1, requires_grad=True)
        opt = torch.optim.Adam([scores], lr=0.05)
        for _ in range(300):
            ids = torch.multinomial(probs, 256, replacement=True, generator=gen)
            lq = probs.log()[ids] if corrected else torch.full((256,), -math.log(10))
            loss = sampled_softmax_loss(user, scores[ids], ids, torch.zeros(0, 1), ids[:0], lq, torch.zeros(0))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return scores.detach().squeeze(1)

    x = probs.log() - probs.log().mean()

    def slope(s: torch.Tensor) -> float:
        return float(((s - s.mean()) * x).sum() / (x * x).sum())

    assert 0.8 < slope(fit(corrected=True)) < 1.2
    assert abs(slope(fit(corrected=False))) < 0.3


def test_numerically_safe() -> None:
    """Tiny temperature, bf16 inputs, every negative masked, an empty batch: finite, with grads."""
    gen = torch.Generator().manual_seed(4)
    u = F.normalize(torch.randn(4, 8, generator=gen), dim=-1).bfloat16().requires_grad_()
    p = F.normalize(torch.randn(4, 8, generator=gen), dim=-1).bfloat16()
    ids = torch.tensor([3, 3, 3, 3])
    lq = torch.full((4,), -50.0)
    loss = sampled_softmax_loss(u, p, ids, p[:2], torch.tensor([3, 3]), lq, torch.zeros(2), temperature=1e-4)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(u.grad).all()
    zeros = torch.zeros(4)
    big = sampled_softmax_loss(u * 1e3, p, torch.arange(4), p, torch.arange(4, 8), zeros, zeros, temperature=1e-4)
    assert torch.isfinite(big)
    empty = sampled_softmax_loss(u[:0], p[:0], ids[:0], p, ids, ids[:0].float(), torch.zeros(4))
    assert empty.item() == 0.0 and empty.requires_grad


def test_bce_ranking_loss_by_hand() -> None:
    log2 = math.log(2)
    pos = torch.tensor([0.0, 2.0])
    neg = torch.tensor([[0.0, 0.0], [-1.0, 100.0]])
    keep = torch.tensor([[True, True], [True, False]])
    want = (2 * log2 + math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    assert abs(bce_ranking_loss(pos, neg, keep).item() - want) < 1e-6
    assert abs(bce_ranking_loss(pos[:1], neg[:1]).item() - 2 * log2) < 1e-6
    assert torch.isfinite(bce_ranking_loss(torch.tensor([-1e4]), torch.tensor([[1e4]])))
    assert bce_ranking_loss(pos[:0], neg[:0]).item() == 0.0


def test_the_whole_catalog_as_uniform_negatives_is_the_exact_softmax() -> None:
    """What `TrainBatch.full_catalog` relies on: every item once, log q = -log(catalog), no
    in-batch source: the row's target is masked among the negatives and the loss is plain
    cross-entropy over the catalog."""
    gen = torch.Generator().manual_seed(2)
    catalog = F.normalize(torch.randn(30, 8, generator=gen), dim=-1)
    u = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    target = torch.tensor([0, 3, 3, 17, 29, 8])
    order = torch.randperm(30, generator=gen)  # any order: the learner shuffles the catalog
    got = sampled_softmax_loss(u, catalog[target], target, catalog[order], order, torch.zeros(6),
                               torch.full((30,), -math.log(30)), in_batch=False, temperature=0.1)
    torch.testing.assert_close(got, F.cross_entropy(u @ catalog.T / 0.1, target))
