"""Standalone fitting of a learned codec against a frozen model (benchmarks, offline refits).

The trainer instead takes one step of `codec.auxiliary_loss(model, cache, item_rows)` after each
micro-batch (liverec/trainer/codec_training.py); this routine is that loop with the model frozen
over a fixed set of caches, so a codec can be fitted after the fact to a given model version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from liverec.model.codecs.base import StateCodec
from liverec.model.codecs.collective import CollectiveCodec
from liverec.model.encoder import KVCache

if TYPE_CHECKING:
    from liverec.model.recommender import SequentialRecommender


def fit_codec(
    codec: StateCodec,
    model: SequentialRecommender,
    caches: Sequence[KVCache],
    item_rows: Tensor | None = None,
    steps: int = 200,
    lr: float | None = None,
    items_per_step: int = 512,
    seed: int = 0,
    log: Callable[[int, float], None] | None = None,
    init_rows: int = 16384,
    init_iters: int = 6,
) -> list[float]:
    """Fit `codec`'s learned parameters on `caches` (full caches of training users) by
    distillation from `model` (frozen here, left as it was); returns the loss of every step.

    `item_rows [N, D]` (`ItemSide.retrieval` rows of the catalog): each step compares retrieval
    logits over `items_per_step` of them drawn at random. `collective` starts from k-means / PCA
    on the caches and recalibrates its int8 scales at the end. `lr` defaults to the codec's
    `fit_lr` (pool entries move in standardised units and want a smaller step than tokens);
    `init_rows` / `init_iters` size collective's k-means start.
    """
    module = codec.module
    loss_fn = getattr(codec, "auxiliary_loss", None)
    if module is None or loss_fn is None:
        raise ValueError(f"codec {codec.codec_id!r} has nothing to fit")
    gen = torch.Generator().manual_seed(seed)
    if isinstance(codec, CollectiveCodec):
        codec.collective.init_from(caches, iters=init_iters, seed=seed, max_rows=init_rows)
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    model.eval()
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=lr if lr is not None else getattr(codec, "fit_lr", 1e-2))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    losses = []
    try:
        for step in range(steps):
            cache = caches[int(torch.randint(len(caches), (1,), generator=gen))]
            rows = None
            if item_rows is not None:
                pick = torch.randperm(item_rows.shape[0], generator=gen)[:items_per_step]
                rows = item_rows[pick.to(item_rows.device)]
            loss = loss_fn(model, cache, rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if log is not None:
                log(step, losses[-1])
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
        module.eval()
    if isinstance(codec, CollectiveCodec):
        pool = codec.collective
        with torch.no_grad():
            z = torch.cat([pool.features(c)[c.valid] for c in caches])
        pool.calibrate(z)
    return losses


def mean_loss(
    codec: StateCodec, model: SequentialRecommender, caches: Sequence[KVCache], item_rows: Tensor | None = None
) -> float:
    """The auxiliary loss averaged over `caches`, without gradients (for tests and logs)."""
    loss_fn = getattr(codec, "auxiliary_loss")
    with torch.no_grad():
        return float(sum(float(loss_fn(model, c, item_rows)) for c in caches) / len(caches))
