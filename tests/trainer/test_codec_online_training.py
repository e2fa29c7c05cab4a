"""Learned state codecs trained online by the real trainer (real broker, real RocksDB); the state
refresh's append path and its bounded re-encode of stale users."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from rocksdict import Options, Rdict

from liverec.model.codecs.record import StateRecord, decode_record
from liverec.model.config import EncoderConfig, ModelConfig
from liverec.platform.config import LiverecConfig
from liverec.trainer.state import STATE_CF, VERSION_CF
from liverec.trainer.worker import TrainerWorker, state_digest
from tests.trainer.conftest import publish_ml100k, small

LEARNED = {"summary": {"tokens": 4}, "collective": {"pool_size": 64, "rank": 4, "groups": 2}}


def deterministic(config: LiverecConfig, state_dir) -> LiverecConfig:
    """Deterministic batches of 16 events per partition: enough steps in a short replay. No dense
    warmup: over ~90 steps a 50-step ramp would start the encoder moving mid-replay, and the codec
    chases it, where this test checks that the codec learns to stand in for a cache."""
    cfg = small(config, state_dir, deterministic=True)
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, batch_events=16, dense_warmup_steps=0))


def with_state(config: LiverecConfig, codec: str, params: dict | None = None, **state: object) -> LiverecConfig:
    return dataclasses.replace(config, state=dataclasses.replace(config.state, codec=codec, params=params or {},
                                                                 **state))


def stored_records(worker: TrainerWorker) -> dict[int, StateRecord]:
    """Every state record in the trainer's RocksDB (after its run closed it), by user."""
    options = Options(raw_mode=True)
    db = Rdict(str(worker.state_dir / "state"), options, column_families={STATE_CF: options, VERSION_CF: options})
    family = db.get_column_family(STATE_CF)
    try:
        return {int.from_bytes(key, "big", signed=True): decode_record(value) for key, value in family.items()}
    finally:
        family.close()
        db.close()


@pytest.mark.parametrize("codec", sorted(LEARNED))
def test_learned_codec_trains_online_and_a_restart_restores_it_bit_for_bit(codec, config, ml100k, tmp_path) -> None:
    publish_ml100k(config, ml100k, 1500)
    reference_cfg = with_state(deterministic(config, tmp_path / "reference"), codec, LEARNED[codec])
    reference = TrainerWorker(reference_cfg)
    trainer = reference.codec_trainer
    ratios: list[float] = []
    step = trainer.step
    untrained: list = []

    def recording_step(model, cache, catalog) -> float:
        """After each step: the live codec's auxiliary loss over these whole caches and the whole
        catalog, against a codec that learned nothing since its initialisation on the same ones.
        The model keeps learning, so the loss itself is a moving target; the ratio is not."""
        if not untrained:
            if not trainer.initialised:  # collective: its pool from the first caches, as step does it
                trainer.live.collective.init_from([cache], seed=trainer.seed)
                trainer.initialised = True
            untrained.append(copy.deepcopy(trainer.live))
        loss = step(model, cache, catalog)
        with torch.no_grad():
            rows = model.item_side(catalog).retrieval
            was = model.training
            model.eval()
            trainer.module.eval()
            ratios.append(float(trainer.live.auxiliary_loss(model, cache, rows))
                          / float(untrained[0].auxiliary_loss(model, cache, rows)))
            model.train(was)
        return loss

    trainer.step = recording_step
    reference.run(idle_exit_s=2)
    assert reference.counters.applied == 1500
    quarter = len(ratios) // 4
    assert quarter >= 3
    # The codec learns to stand in for the cache: its loss relative to an untrained one's falls,
    # to clearly below it (over this short replay: summary 0.85 -> 0.23, collective 0.89 -> 0.79).
    assert np.mean(ratios[-quarter:]) < min(np.mean(ratios[:quarter]), 0.9)

    records = stored_records(reference)
    assert records and all(r.codec_id == codec for r in records.values())
    generations = {r.params_version for r in records.values()}
    assert 0 not in generations and max(generations) <= reference.learner.version

    interrupted_cfg = with_state(deterministic(config, tmp_path / "interrupted"), codec, LEARNED[codec])
    first = TrainerWorker(interrupted_cfg)
    first.run(max_events=700)
    saved = first.codec_trainer.state_dict()
    restored = TrainerWorker(interrupted_cfg)
    again = restored.codec_trainer.state_dict()
    for name, tensor in saved["live"].items():  # the learned parameters, exactly as they were
        assert torch.equal(again["live"][name], tensor), name
    assert str(again["optimizer"]) == str(saved["optimizer"]) and again["steps"] == saved["steps"] > 0
    restored.run(idle_exit_s=2)
    # Dense weights, store rows, histories and the codec's learned parameters: bit for bit.
    assert state_digest(TrainerWorker(interrupted_cfg)) == state_digest(TrainerWorker(reference_cfg))


def test_versions_behind_rises_while_the_model_moves_and_falls_as_reencode_catches_up(config, ml100k,
                                                                                       tmp_path) -> None:
    publish_ml100k(config, ml100k, 1500)
    cfg = with_state(small(config, tmp_path / "state"), "int8", reencode_per_batch=1)
    busy = TrainerWorker(cfg)
    busy.run(max_events=1500)
    version = busy.learner.version
    behind = busy.metrics.registry.get_sample_value("liverec_trainer_state_versions_behind")
    records = stored_records(busy)
    oldest = min(r.model_version for r in records.values())
    assert behind == version - oldest > 1  # one re-encode per batch cannot keep up with every user

    idle = TrainerWorker(cfg)
    idle.run(idle_exit_s=1)  # no new events: the background re-encode catches up
    assert idle.learner.version == version
    assert idle.metrics.registry.get_sample_value("liverec_trainer_state_versions_behind") == 0
    assert idle.metrics.registry.get_sample_value("liverec_trainer_state_reencoded_total") > 0
    after = stored_records(idle)
    assert after.keys() == records.keys()
    assert {r.model_version for r in after.values()} == {version}
    for user, record in after.items():  # re-encoded states still say which events they include
        assert (record.last_offset, record.last_event_time_ms) == (records[user].last_offset,
                                                                   records[user].last_event_time_ms)


def test_trainer_append_equals_full_recompute_for_the_full_codec(config, ml100k, tmp_path) -> None:
    """With learning rates too small to move any weight, every model version is the same model,
    so appending is exact up to float rounding: compare against re-encoding every state."""
    publish_ml100k(config, ml100k, 1500)
    frozen_model = {"dense_lr": 1e-30, "item_lr": 1e-30}

    def run(name: str, append: int) -> TrainerWorker:
        cfg = deterministic(config, tmp_path / name)
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **frozen_model),
                                  model=ModelConfig(encoder=EncoderConfig(dim=16, layers=2, heads=2, max_len=60)))
        worker = TrainerWorker(with_state(cfg, "full", reencode_per_batch=0, append_max_versions_behind=append))
        worker.run(idle_exit_s=2)
        return worker

    appended, recomputed = run("append", 10**6), run("recompute", 0)
    assert appended.metrics.registry.get_sample_value("liverec_trainer_state_appends_total") > 20
    assert recomputed.metrics.registry.get_sample_value("liverec_trainer_state_appends_total") == 0
    got, want = stored_records(appended), stored_records(recomputed)
    assert got.keys() == want.keys()
    codec = appended.codec
    for user, record in got.items():
        a, b = codec.decode([record.payload]), codec.decode([want[user].payload])
        assert torch.equal(a.valid, b.valid) and torch.equal(a.next_pos, b.next_pos)
        for (ka, va), (kb, vb) in zip(a.layers, b.layers, strict=True):
            torch.testing.assert_close(ka, kb, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(va, vb, atol=2e-5, rtol=1e-4)
        assert (record.last_offset, record.last_event_time_ms) == (want[user].last_offset,
                                                                   want[user].last_event_time_ms)
