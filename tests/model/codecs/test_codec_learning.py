"""Learned codecs: their auxiliary (distillation) losses fall when fitted, and train with the model."""

from __future__ import annotations

import torch

from liverec.model import EncoderConfig, KVCache
from liverec.model.codecs import codec_from_config, distillation_loss, fit_codec
from liverec.model.codecs.fit import mean_loss

ENC = EncoderConfig(dim=16, layers=2, heads=2, max_len=12, dropout=0.0)


def distill_only(codec, model, caches, item_rows) -> float:
    """The distillation part alone (collective adds a reconstruction term to its loss)."""
    with torch.no_grad():
        total = 0.0
        for cache in caches:
            student = codec.module(cache) if codec.codec_id == "summary" else codec.collective.reconstruct(cache)
            total += float(distillation_loss(model, cache, student, item_rows))
        return total / len(caches)


def test_summary_distillation_loss_falls(model, table, make_cache) -> None:
    train = [make_cache(16, 12, seed=s, min_len=2) for s in range(4)]
    held_out = [make_cache(16, 12, seed=100, min_len=2)]
    rows = model.item_side(table.weight).retrieval.detach()
    codec = codec_from_config("summary", ENC, tokens=3)
    before = mean_loss(codec, model, held_out, rows)
    losses = fit_codec(codec, model, train, rows, steps=60, lr=3e-2)
    after = mean_loss(codec, model, held_out, rows)
    assert after < 0.5 * before, (before, after)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert all(p.requires_grad for p in model.parameters())  # fit_codec leaves the model as it was


def test_collective_distillation_loss_falls(model, table, make_cache) -> None:
    train = [make_cache(16, 12, seed=s, min_len=2) for s in range(16)]
    held_out = [make_cache(16, 12, seed=100, min_len=2)]
    rows = model.item_side(table.weight).retrieval.detach()
    codec = codec_from_config("collective", ENC, pool_size=16, rank=2)
    codec.collective.init_from(train)  # fit_codec starts from the same k-means / PCA
    before = distill_only(codec, model, train, rows), distill_only(codec, model, held_out, rows)
    fit_codec(codec, model, train, rows, steps=60)
    after = distill_only(codec, model, train, rows), distill_only(codec, model, held_out, rows)
    assert after[0] < 0.8 * before[0], (before, after)
    assert after[1] < before[1], (before, after)  # and it generalises to users it was not fitted on


def test_auxiliary_losses_train_the_model_too(model, table, histories) -> None:
    """Added to the trainer's loss, the gradient reaches the codec and, through a live cache,
    the encoder (the teacher side is constant)."""
    items, valid = histories(8, 10, min_len=2)
    rows = model.item_side(table.weight).retrieval.detach()
    for name in ("summary", "collective"):
        codec = codec_from_config(name, ENC)
        model.zero_grad()
        cache = model.encode(table(items).detach(), torch.ones_like(items), valid)
        if name == "collective":
            frozen = [(k.detach(), v.detach()) for k, v in cache.layers]
            codec.collective.init_from([KVCache(frozen, cache.valid, cache.next_pos)], iters=1)
        codec.auxiliary_loss(model, cache, rows).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in codec.module.parameters()), name
        assert model.encoder.blocks[0].qkv.weight.grad.abs().sum() > 0, name
