"""Parameters published by the trainer rebuild, on the serving side, exactly the trained state."""

from __future__ import annotations

import torch

from liverec.serving.params import ParamsMaterializer
from liverec.trainer.items import ITEM_TABLE
from liverec.trainer.worker import TrainerWorker

from tests.trainer.conftest import publish_ml100k, read_topic, small


def materialize(config) -> tuple[ParamsMaterializer, list[int]]:
    materializer = ParamsMaterializer()
    versions = []
    for rec in read_topic(config, config.topics.params, 1):
        done = materializer.apply(rec.key, rec.value)
        if done is not None:
            versions.append(done.version)
    return materializer, versions


def test_published_params_equal_the_trained_state(config, ml100k, tmp_path) -> None:
    publish_ml100k(config, ml100k, 1500)
    cfg = small(config, tmp_path / "state", publish_every_s=0.2)
    worker = TrainerWorker(cfg)
    worker.run(idle_exit_s=2)
    materializer, versions = materialize(config)

    assert len(versions) >= 2 and versions == sorted(versions)  # several deltas, in order
    final = materializer.committed
    assert final is not None and final.version == worker.learner.version
    assert final.model_config == cfg.model
    # Serving gets the moving average of the trained weights (trainer.serving_ema), exactly.
    assert cfg.trainer.serving_ema > 0
    for name, tensor in worker.learner.serving_model.state_dict().items():
        assert torch.equal(final.dense_state[name], tensor), name
    trained = worker.learner.model.state_dict()
    assert any(not torch.equal(final.dense_state[n], trained[n]) for n in trained)  # an average, not a copy

    keys, weights = worker.store.table_items(ITEM_TABLE)
    order = torch.argsort(keys)
    got_keys, got_weights, got_counts = final.table(ITEM_TABLE)
    assert torch.equal(got_keys, keys[order])  # every row, and only live rows
    assert torch.equal(got_weights, weights[order].float())
    assert torch.equal(got_counts, worker.store.frequency(ITEM_TABLE, keys[order]))
