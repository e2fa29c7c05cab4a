"""Learned codecs across the trainer → serving boundary: a replica decodes every state record with
the codec parameters of the version that encoded it, keeps a bounded number of versions, and
answers Recommend from states the online trainer wrote."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry

from liverec.model.codecs.record import record_for
from liverec.model.codecs.registry import codec_from_config
from liverec.model.config import EncoderConfig, ModelConfig
from liverec.model.encoder import KVCache
from liverec.serving.backend import Query
from liverec.serving.process import build_replica
from liverec.serving.states import CodecStates, StateMetrics, pack
from liverec.trainer.worker import TrainerWorker
from tests.trainer.conftest import publish_ml100k, small

ENC = EncoderConfig(dim=16, layers=2, heads=2, max_len=12, dropout=0.0)
LEARNED = {"summary": {"tokens": 4}, "collective": {"pool_size": 64, "rank": 4, "groups": 2}}
CPU = SimpleNamespace(device=torch.device("cpu"))  # what CodecStates reads of a snapshot


def cache_of(seed: int) -> KVCache:
    gen = torch.Generator().manual_seed(seed)
    layers = [(torch.randn(3, 2, 7, 8, generator=gen), torch.randn(3, 2, 7, 8, generator=gen)) for _ in range(2)]
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[0, :3] = False
    return KVCache(layers, valid, torch.tensor([4, 7, 9]))


def generation(seed: int):
    torch.manual_seed(seed)
    codec = codec_from_config("collective", ENC, pool_size=16, rank=2, groups=2)
    codec.collective.init_from([cache_of(seed)], seed=seed)
    return codec


def test_collective_records_decode_with_the_pool_of_their_own_version() -> None:
    def make():
        return codec_from_config("collective", ENC, pool_size=16, rank=2, groups=2)

    registry = CollectorRegistry()
    states = CodecStates(make(), StateMetrics(registry), make_codec=make, generations_kept=2)
    first, second = generation(1), generation(2)
    states.install(10, first.collective.state_dict())
    states.install(20, second.collective.state_dict())
    cache = cache_of(7)
    values = []
    for codec, version in ((first, 10), (second, 20)):
        payload = codec.encode(cache)[1]
        values.append(pack(record_for(codec, payload, model_version=version, last_offset=5, last_event_time_ms=1,
                                      params_version=version), b""))
    got = states(values, CPU)
    for state, codec, value in zip(got, (first, second), values, strict=True):
        assert state is not None
        want = codec.decode([codec.encode(cache)[1]])
        for (k, v), (wk, wv) in zip(state.cache.layers, want.layers, strict=True):
            assert torch.equal(k, wk) and torch.equal(v, wv)
    # The two pools differ, so decoding a record with the other version's pool would not be exact.
    assert not torch.equal(first.decode([first.encode(cache)[1]]).layers[0][0],
                           second.decode([first.encode(cache)[1]]).layers[0][0])

    states.install(30, generation(3).collective.state_dict())  # beyond two kept: version 10 goes
    assert states.generations() == [20, 30]
    dropped, kept = states(values, CPU)
    assert dropped is None and kept is not None  # a miss until the trainer re-encodes it, never an error
    assert registry.get_sample_value("liverec_serving_state_lookups_total", {"result": "unknown_params"}) == 1


def test_summary_records_decode_without_parameters_whatever_version_wrote_them() -> None:
    codec = codec_from_config("summary", ENC, tokens=3)
    states = CodecStates(codec_from_config("summary", ENC, tokens=3), StateMetrics(CollectorRegistry()))
    payload = codec.encode(cache_of(4))[2]
    value = pack(record_for(codec, payload, model_version=99, last_offset=1, last_event_time_ms=1,
                            params_version=98), b"")
    (state,) = states([value], CPU)
    assert state is not None and int(state.cache.valid.sum()) == 3
    want = codec.decode([payload])
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(state.cache.layers, want.layers, strict=True))


def wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.mark.parametrize("codec", sorted(LEARNED))
def test_replica_serves_states_of_the_online_trained_codec(codec, config, ml100k, tmp_path) -> None:
    publish_ml100k(config, ml100k, 1500)
    cfg = small(config, tmp_path / "trainer", publish_every_s=0.2)
    cfg = dataclasses.replace(
        cfg, model=ModelConfig(encoder=EncoderConfig(dim=16, layers=2, heads=2, max_len=10)),
        state=dataclasses.replace(cfg.state, codec=codec, params=LEARNED[codec], reencode_per_batch=4),
        serving=dataclasses.replace(cfg.serving, state_dir=str(tmp_path / "serving"), device="cpu", ready_max_lag=0))
    worker = TrainerWorker(cfg)
    worker.run(idle_exit_s=2)
    probe = TrainerWorker(cfg)  # the run closed its stores; a restored worker reads the histories
    users = sorted(user for user, _ in probe.history.items())
    probe.history.close()

    registry = CollectorRegistry()
    replica, backend = build_replica(cfg, registry)
    replica.start()
    try:
        wait_for(lambda: replica.ready() and replica.snapshot().version == worker.learner.version)
        snapshot = replica.snapshot()
        answers = backend.recommend(snapshot, [Query(user, 10) for user in users])
        assert all(not a.cold_start and len(a.items) == 10 for a in answers)
        assert registry.get_sample_value("liverec_serving_state_lookups_total", {"result": "hit"}) == len(users)
        generations = replica.decode_states.generations()
        if codec == "collective":
            assert len(generations) > 1 and generations[-1] == worker.learner.version
        else:
            assert generations == []  # summary decodes without parameters: nothing to keep
    finally:
        replica.stop()

    restarted, backend = build_replica(cfg, CollectorRegistry())  # generations come back from its RocksDB
    try:
        assert restarted.decode_states.generations() == generations
        answers = backend.recommend(restarted.snapshot(), [Query(user, 10) for user in users])
        assert all(not a.cold_start for a in answers)
    finally:
        restarted.stop()
