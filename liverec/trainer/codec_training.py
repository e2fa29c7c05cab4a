"""Online training of a learned state codec (`summary`, `collective`) alongside the model.

After each micro-batch's learner step the worker encodes the touched users' histories with the
updated model (the state refresh needs those caches anyway) and hands them here: one Adam step
on the codec's module with `codec.auxiliary_loss`, a distillation of the current model's answers
over the full caches into the codec's reconstruction. The model's weights are frozen for that
step (the codec follows the model; it never pulls the model towards what is easy to compress).

Two copies of the codec. `live` learns every micro-batch; `frozen` encodes the states the
trainer writes and changes only when the worker publishes a version (`freeze`), so every state
record names a parameter version (`params_version`) that serving receives in `liverec.params`,
and a `collective` payload is decoded with exactly the pool it was encoded with. `collective`'s
pool starts from the first caches it sees (k-means / PCA, seeded), before anything is encoded
with it. Everything here is deterministic given the caches and is checkpointed (`state_dict`),
so a restored trainer continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from liverec.model.codecs.base import StateCodec
from liverec.model.codecs.collective import CollectiveCodec
from liverec.model.encoder import KVCache
from liverec.model.recommender import SequentialRecommender

#: Catalog rows the distillation compares retrieval logits over, per step (like `fit_codec`).
ITEMS_PER_STEP = 512
#: Users an auxiliary step trains on (a random subset of the batch's): bounds the step's cost,
#: which for `collective` is routing every position over its pools.
USERS_PER_STEP = 64
#: `collective`'s int8 scales follow each batch's codes with this momentum (a batch has few rows).
CALIBRATION_MOMENTUM = 0.9


class CodecTrainer:
    def __init__(self, make_codec: Callable[[], StateCodec], seed: int) -> None:
        self.live = make_codec()
        self.frozen = make_codec()
        module = self.live.module
        if module is None:
            raise ValueError(f"codec {self.live.codec_id!r} has no learned parameters to train")
        self.module = module
        self.optimizer = torch.optim.Adam(module.parameters(), lr=getattr(self.live, "fit_lr", 1e-3))
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.initialised = not isinstance(self.live, CollectiveCodec)
        self.generation = 0  # model version of the frozen parameters; 0 = none yet
        self.steps = 0

    def step(self, model: SequentialRecommender, cache: KVCache, catalog: Tensor) -> float:
        """One auxiliary step on the users of `cache` (full caches of the current model, no grad);
        `catalog [M, D]`: the item table's raw rows, sampled for the retrieval-logit term."""
        if not self.initialised:
            assert isinstance(self.live, CollectiveCodec)
            self.live.collective.init_from([cache], seed=self.seed)
            self.initialised = True
        cache = self._subset(cache)
        item_rows = self._item_rows(model, catalog)
        frozen = [p for p in model.parameters() if p.requires_grad]
        was_training = model.training
        for p in frozen:
            p.requires_grad_(False)
        model.eval()
        self.module.train()
        try:
            loss = self.live.auxiliary_loss(model, cache, item_rows)  # type: ignore[attr-defined]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        finally:
            for p in frozen:
                p.requires_grad_(True)
            model.train(was_training)
            self.module.eval()
        if isinstance(self.live, CollectiveCodec):
            pool = self.live.collective
            with torch.no_grad():
                pool.calibrate(pool.features(cache)[cache.valid], momentum=CALIBRATION_MOMENTUM)
        self.steps += 1
        return float(loss.detach())

    def _subset(self, cache: KVCache) -> KVCache:
        users = cache.valid.shape[0]
        if users <= USERS_PER_STEP:
            return cache
        pick = torch.randperm(users, generator=self.generator)[:USERS_PER_STEP].sort().values.to(cache.valid.device)
        layers = [(k[pick], v[pick]) for k, v in cache.layers]
        return KVCache(layers, cache.valid[pick], cache.next_pos[pick])

    def _item_rows(self, model: SequentialRecommender, catalog: Tensor) -> Tensor | None:
        if not len(catalog):
            return None
        pick = torch.randperm(catalog.shape[0], generator=self.generator)[:ITEMS_PER_STEP]
        with torch.no_grad():
            return model.item_side(catalog[pick.to(catalog.device)]).retrieval

    def freeze(self, version: int) -> dict[str, Tensor]:
        """Make the live parameters the ones states are encoded with, as those of model version
        `version` (the version being published); returns their state_dict to publish."""
        state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        frozen = self.frozen.module
        assert frozen is not None
        frozen.load_state_dict(state)
        self.generation = version
        return state

    def frozen_state(self) -> dict[str, Tensor]:
        frozen = self.frozen.module
        assert frozen is not None
        return {k: v.detach().clone() for k, v in frozen.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"live": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "frozen": self.frozen_state(), "generation": self.generation, "initialised": self.initialised,
                "generator": self.generator.get_state(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["live"])
        self.optimizer.load_state_dict(state["optimizer"])
        frozen = self.frozen.module
        assert frozen is not None
        frozen.load_state_dict(state["frozen"])
        self.generation = int(state["generation"])
        self.initialised = bool(state["initialised"])
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
