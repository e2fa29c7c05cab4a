"""Incremental codecs: appending new events' K/V gives the bytes of re-encoding the extended cache."""

from __future__ import annotations

import pytest
import torch

from liverec.model import EncoderConfig, KVCache
from liverec.model.codecs import codec_from_config, last_events
from liverec.model.codecs.base import user_rows

ENC = EncoderConfig(dim=16, layers=2, heads=2, max_len=12, dropout=0.0)  # the conftest model's


def extend(model, table, cache: KVCache, new: int, seed: int, capacity: int) -> tuple[KVCache, torch.Tensor]:
    """Append up to `new` random events per user (user 1 gets none, user 2 exactly one)."""
    b = cache.valid.shape[0]
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(60, (b, new), generator=gen)
    counts = torch.randint(0, new + 1, (b,), generator=gen)
    counts[1], counts[2] = 0, 1
    valid = torch.arange(new)[None, :] >= (new - counts)[:, None]
    with torch.no_grad():
        _, ext = model.encoder.extend(cache, table(items), torch.ones_like(items), valid, capacity=capacity)
    return ext, counts


CODECS = [
    ("full", {}),
    ("full", {"dtype": "bfloat16"}),
    ("full", {"capacity": 9}),
    ("int8", {}),
    ("window", {"window": 4}),
    ("window", {"window": 1, "dtype": "float16"}),
    ("collective", {"pool_size": 8, "rank": 2}),
]


@pytest.mark.parametrize("name, params", CODECS)
def test_append_equals_reencode(name, params, model, table, make_cache) -> None:
    codec = codec_from_config(name, ENC, **params)
    assert codec.incremental
    cache = make_cache(6, 7, seed=2, min_len=0)
    if name == "collective":
        codec.collective.init_from([cache], iters=2)
    capacity = max(getattr(codec, "window", None) or 1000, 3)  # `new` must hold every new event
    payloads = codec.encode(cache)
    for step in range(3):  # several appends in a row, some users without events
        ext, counts = extend(model, table, cache, new=3, seed=10 + step, capacity=capacity)
        payloads = codec.append(payloads, last_events(ext, counts))
        assert payloads == codec.encode(ext)
        cache = ext
    assert [len(p) for p in payloads] == [codec.bytes_per_user(int(n)) for n in cache.lengths]


def test_appended_full_state_scores_like_the_extended_cache(model, table, make_cache) -> None:
    codec = codec_from_config("full", ENC)
    cache = make_cache(4, 6, seed=4, min_len=1)
    ext, counts = extend(model, table, cache, new=2, seed=3, capacity=1000)
    decoded = codec.decode(codec.append(codec.encode(cache), last_events(ext, counts)))
    with torch.no_grad():
        torch.testing.assert_close(model.user_hidden(decoded), model.user_hidden(ext), rtol=1e-5, atol=1e-6)


def test_last_events_are_the_newest_slots(model, table, make_cache) -> None:
    cache = make_cache(5, 6, seed=1)
    ext, counts = extend(model, table, cache, new=3, seed=5, capacity=1000)
    new = last_events(ext, counts)
    assert new.lengths.tolist() == counts.tolist()
    assert torch.equal(new.next_pos, ext.next_pos)
    for full, tail, n in zip(user_rows(ext), user_rows(new), counts.tolist(), strict=True):
        assert torch.equal(tail, full[len(full) - n:])


def test_append_refuses_events_that_do_not_follow(model, table, make_cache) -> None:
    codec = codec_from_config("full", ENC)
    cache = make_cache(4, 6, seed=1)
    ext, counts = extend(model, table, cache, new=2, seed=3, capacity=1000)
    new = last_events(ext, counts)
    shifted = KVCache(new.layers, new.valid, new.next_pos + 1)
    with pytest.raises(ValueError, match="new events must end at"):
        codec.append(codec.encode(cache), shifted)


@pytest.mark.parametrize("name", ["pages", "summary"])
def test_recompute_codecs_refuse_append(name, model, make_cache) -> None:
    codec = codec_from_config(name, ENC)
    assert not codec.incremental
    cache = make_cache(2, 5)
    with pytest.raises(NotImplementedError, match="not incremental"):
        codec.append(codec.encode(cache, model), cache)
