"""Round trips: exact for `full` fp32, bounded for bf16 and `int8`, documented for the lossy ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from liverec.model import KVCache
from liverec.model.codecs import PayloadError, codec_from_config
from liverec.model.codecs.base import from_rows, to_rows, user_rows

from liverec.model import EncoderConfig

ENC = EncoderConfig(dim=16, layers=2, heads=2, max_len=12, dropout=0.0)  # the conftest model's


def same_slots(a: KVCache, b: KVCache) -> None:
    """Equal valid rows per user (whatever the padding) and equal next positions."""
    assert torch.equal(a.next_pos, b.next_pos)
    for ra, rb in zip(user_rows(a), user_rows(b), strict=True):
        assert torch.equal(ra, rb)


def test_rows_layout_round_trips(make_cache) -> None:
    cache = make_cache(5, 9, min_len=0)
    back = from_rows(to_rows(cache), cache.valid, cache.next_pos)
    for (k, v), (k2, v2) in zip(cache.layers, back.layers, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)


def test_full_fp32_is_exact_and_scores_identically(model, make_cache, table) -> None:
    cache = make_cache(6, 10, min_len=0)
    codec = codec_from_config("full", ENC)
    payloads = codec.encode(cache)
    decoded = codec.decode(payloads)
    same_slots(cache, decoded)
    assert [len(p) for p in payloads] == [codec.bytes_per_user(int(n)) for n in cache.lengths]
    with torch.no_grad():
        h, h2 = model.user_hidden(cache), model.user_hidden(decoded)
        torch.testing.assert_close(h2, h, rtol=1e-5, atol=1e-6)
        rows = model.item_side(table.weight).ranking[:7].expand(6, 7, -1)
        torch.testing.assert_close(model.ranking_scores(decoded, h2, rows), model.ranking_scores(cache, h, rows),
                                   rtol=1e-5, atol=1e-5)


def test_full_bf16_rounds_once(make_cache) -> None:
    cache = make_cache(4, 8)
    codec = codec_from_config("full", ENC, dtype="bfloat16")
    decoded = codec.decode(codec.encode(cache))
    for ra, rb in zip(user_rows(cache), user_rows(decoded), strict=True):
        assert torch.equal(rb, ra.to(torch.bfloat16).float())  # exactly one rounding to bf16
    assert codec.bytes_per_user(10) - 13 == 10 * ENC.layers * 2 * ENC.dim * 2


def test_int8_error_within_stated_bound(make_cache) -> None:
    cache = make_cache(6, 11, seed=3)
    codec = codec_from_config("int8", ENC)
    payloads = codec.encode(cache)
    decoded = codec.decode(payloads)
    assert torch.equal(decoded.next_pos, cache.next_pos)
    worst = 0.0
    for ra, rb in zip(user_rows(cache), user_rows(decoded), strict=True):
        bound = ra.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-5) + 1e-7
        assert ((rb - ra).abs() <= bound).all()
        worst = max(worst, float(((rb - ra).abs() / bound).max()) if ra.numel() else 0.0)
    assert 0.3 < worst <= 1.0  # lossy, and the bound is nearly reached: it is tight
    assert [len(p) for p in payloads] == [codec.bytes_per_user(int(n)) for n in cache.lengths]
    # per position and (layer, K/V, head): D/H int8 codes and one fp32 scale
    assert codec.bytes_per_user(50) == 12 + 50 * ENC.layers * 2 * ENC.heads * (ENC.head_dim + 4)


def test_window_keeps_the_last_w_positions(model, make_cache) -> None:
    cache = make_cache(5, 12, min_len=1)
    codec = codec_from_config("window", ENC, window=4)
    decoded = codec.decode(codec.encode(cache))
    same_slots(cache.compact(4), decoded)
    assert int(decoded.valid.sum(1).max()) == 4
    assert codec.bytes_per_user(4) == codec.bytes_per_user(10_000)


def test_pages_keep_everything_when_the_history_fits(model, make_cache) -> None:
    cache = make_cache(4, 12, min_len=1)
    codec = codec_from_config("pages", ENC, page_size=4, pages=3)
    same_slots(cache, codec.decode(codec.encode(cache, model)))


def test_pages_keep_whole_pages_newest_first(model, make_cache) -> None:
    cache = make_cache(8, 12, min_len=3, seed=5)
    codec = codec_from_config("pages", ENC, page_size=2, pages=3, recent_pages=1)
    keep = codec.select(model, cache)
    payloads = codec.encode(cache, model)
    decoded = codec.decode(payloads)
    lengths = cache.lengths.tolist()
    assert any(n % 2 and n > 6 for n in lengths) and any(n <= 6 for n in lengths)  # both cases below
    for b, n in enumerate(lengths):
        newest_first = keep[b][cache.valid[b]].flip(0)
        assert int(newest_first.sum()) == min(n, 6)
        assert len(payloads[b]) == codec.bytes_per_user(n)
        assert newest_first[:2].all()  # the newest page is always kept
        if n > 6:
            pairs = newest_first[: n // 2 * 2].reshape(-1, 2)
            assert (pairs[:, 0] == pairs[:, 1]).all()  # whole pages only
            assert n % 2 == 0 or not newest_first[-1]  # never the partial oldest page
        assert torch.equal(user_rows(decoded)[b], user_rows(cache)[b][newest_first.flip(0)])
    assert torch.equal(decoded.next_pos, cache.next_pos)
    with torch.no_grad():
        assert torch.isfinite(model.user_hidden(decoded)).all()


def test_encoder_query_returns_the_blocks_own_queries(model, make_cache) -> None:
    """The queries `pages` ranks pages with are the block's own: recompute layer 0's by hand."""
    from liverec.model.encoder import rope, rope_tables

    cache = make_cache(3, 6)
    with torch.no_grad():
        hidden, queries = model.encoder.query(cache, return_queries=True)
        torch.testing.assert_close(hidden, model.user_hidden(cache))
        enc = model.encoder
        x = enc.query_token.expand(3, 1, ENC.dim)
        q = enc.blocks[0].qkv(enc.blocks[0].norm1(x))[:, 0, : ENC.dim].reshape(3, ENC.heads, ENC.head_dim)
        cos, sin = rope_tables(cache.next_pos, ENC.head_dim, ENC.rope_base, q.dtype)
        torch.testing.assert_close(queries[0], rope(q, cos[:, None], sin[:, None]))


@pytest.mark.parametrize("name, params", [("pages", {"page_size": 4, "pages": 2}), ("summary", {"tokens": 3})])
def test_bytes_flat_in_history_length(name, params, model, table) -> None:
    codec = codec_from_config(name, ENC, **params)
    sizes = []
    for length in (10, 40, 120):
        items = torch.randint(60, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            cache = model.encode(table(items), torch.ones_like(items))
        payloads = codec.encode(cache, model)
        assert [len(p) for p in payloads] == [codec.bytes_per_user(length)] * 2
        sizes.append(len(payloads[0]))
    assert sizes[0] == sizes[1] == sizes[2]
    assert codec.bytes_per_user(200) == codec.bytes_per_user(10_000)


def test_summary_decodes_to_its_tokens(model, make_cache) -> None:
    cache = make_cache(4, 10, min_len=0)
    cache = KVCache(cache.layers, cache.valid.clone(), cache.next_pos)
    cache.valid[3] = False  # a user without events
    codec = codec_from_config("summary", ENC, tokens=3)
    decoded = codec.decode(codec.encode(cache))
    with torch.no_grad():
        direct = codec.summary(cache)
    assert decoded.valid.sum(1).tolist() == [3, 3, 3, 0]
    for ra, rb in zip(user_rows(direct), user_rows(decoded), strict=True):
        assert torch.equal(ra, rb)
    with torch.no_grad():
        assert torch.isfinite(model.user_hidden(decoded)).all()


@pytest.mark.parametrize("groups", [1, 4])
def test_collective_decode_equals_its_differentiable_reconstruction(groups, model, make_cache) -> None:
    caches = [make_cache(8, 12, seed=s) for s in range(3)]
    codec = codec_from_config("collective", ENC, pool_size=16, rank=3, groups=groups)
    codec.collective.init_from(caches, iters=3)
    cache = caches[0]
    payloads = codec.encode(cache)
    assert [len(p) for p in payloads] == [12 + int(n) * (groups + 3) for n in cache.lengths]
    decoded = codec.decode(payloads)
    with torch.no_grad():
        direct = codec.collective.reconstruct(cache)
    assert torch.equal(decoded.next_pos, cache.next_pos) and torch.equal(decoded.lengths, cache.lengths)
    for ra, rb in zip(user_rows(direct), user_rows(decoded), strict=True):
        torch.testing.assert_close(rb, ra, rtol=1e-4, atol=1e-4)


def test_collective_error_shrinks_with_rank_and_pool(make_cache) -> None:
    caches = [make_cache(8, 12, seed=s) for s in range(3)]

    def error(pool: int, rank: int, groups: int = 1) -> float:
        codec = codec_from_config("collective", ENC, pool_size=pool, rank=rank, groups=groups)
        codec.collective.init_from(caches, iters=3)
        decoded = codec.decode(codec.encode(caches[0]))
        return sum(float((a - b).pow(2).sum()) for a, b in zip(user_rows(caches[0]), user_rows(decoded), strict=True))

    assert error(64, 8) < error(64, 1) < error(4, 1)
    assert error(16, 1, groups=4) < error(16, 1, groups=1)  # product pools: more combinations


def test_collective_two_byte_index(make_cache) -> None:
    codec = codec_from_config("collective", ENC, pool_size=300, rank=2, groups=2)
    cache = make_cache(8, 12)
    codec.collective.init_from([cache], iters=1)
    payloads = codec.encode(cache)
    assert [len(p) for p in payloads] == [12 + int(n) * (2 * 2 + 2) for n in cache.lengths]
    assert int(codec.collective.route(codec.collective.features(cache)).max()) > 255  # needs the 2nd byte
    with torch.no_grad():
        direct = codec.collective.reconstruct(cache)
    for ra, rb in zip(user_rows(direct), user_rows(codec.decode(payloads)), strict=True):
        torch.testing.assert_close(rb, ra, rtol=1e-4, atol=1e-4)


def test_payloads_of_another_shape_are_refused(make_cache) -> None:
    cache = make_cache(2, 5)
    payload = codec_from_config("full", ENC).encode(cache)[0]
    with pytest.raises(PayloadError, match="full: payload has"):
        codec_from_config("full", ENC).decode([payload[:-1]])
    with pytest.raises(PayloadError, match="stores torch.float32"):
        codec_from_config("full", ENC, dtype="bfloat16").decode([payload])
    with pytest.raises(PayloadError, match="shorter than its header"):
        codec_from_config("collective", ENC).decode([b"abc"])


def test_pages_pick_the_page_the_query_points_at(model, make_cache) -> None:
    """Query-centric, not just recency: an old page whose keys align with the query token's
    queries is kept over more recent pages, and a page pointing away is dropped."""
    cache = make_cache(1, 12, min_len=12)
    with torch.no_grad():
        _, queries = model.encoder.query(cache, return_queries=True)
    layers = []
    for (k, v), q in zip(cache.layers, queries, strict=True):
        k = k * 0.01
        k[:, :, 2:4] = 10 * q[:, :, None, :]  # page 4 of 6 (0 = newest): slots 2, 3
        k[:, :, 8:10] = -10 * q[:, :, None, :]  # page 1: slots 8, 9
        layers.append((k, v))
    codec = codec_from_config("pages", ENC, page_size=2, pages=3, recent_pages=1)
    keep = codec.select(model, KVCache(layers, cache.valid, cache.next_pos))[0]
    assert keep[[2, 3, 10, 11]].all()  # the aligned page and the newest page
    assert not keep[[8, 9]].any()
    assert int(keep.sum()) == 6


@pytest.mark.parametrize("name", ["full", "int8", "window", "pages", "summary", "collective"])
def test_decode_on_the_serving_device_scores_like_cpu(name, model, make_cache, device) -> None:
    """Payloads written on the CPU decode onto `device` (CUDA with LIVEREC_TEST_DEVICE=cuda) and
    score as on the CPU; learned parts are moved with the model."""
    cache = make_cache(4, 10, seed=7, min_len=1)
    codec = codec_from_config(name, ENC)
    if name == "collective":
        codec.collective.init_from([cache], iters=2)
    payloads = codec.encode(cache, model)
    with torch.no_grad():
        expected = model.user_hidden(codec.decode(payloads))
        if codec.module is not None:
            codec.module.to(device)
        decoded = codec.decode(payloads, device)
        assert decoded.valid.device.type == torch.device(device).type
        got = model.to(device).user_hidden(decoded)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4), st.integers(0, 9), st.integers(0, 2**31 - 1),
    st.sampled_from([("full", {}), ("int8", {}), ("window", {"window": 3}), ("full", {"dtype": "float16"})]),
)
def test_any_padding_pattern_round_trips(batch, width, seed, spec) -> None:
    """Padding anywhere (holes from chunked extension too): a user's valid slots, in order,
    are what is stored; decoding left-packs them."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, ENC.heads, width, ENC.head_dim)
    layers = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(ENC.layers)]
    valid = torch.rand(batch, width, generator=gen) < 0.6
    cache = KVCache(layers, valid, valid.sum(1) + torch.randint(0, 100, (batch,), generator=gen))
    name, params = spec
    codec = codec_from_config(name, ENC, **params)
    decoded = codec.decode(codec.encode(cache))
    assert torch.equal(decoded.next_pos, cache.next_pos)
    keep = getattr(codec, "window", None)
    for ra, rb in zip(user_rows(cache), user_rows(decoded), strict=True):
        ra = ra[-keep:] if keep and len(ra) > keep else ra
        assert rb.shape == ra.shape
        if name == "int8":
            assert ((rb - ra).abs() <= ra.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-5) + 1e-7).all()
        else:
            assert torch.equal(rb, ra.to(codec.dtype).float())
