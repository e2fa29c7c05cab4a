"""The encoder: shapes, causality, incremental extension equals recompute, the query over K/V."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from liverec.model import EncoderConfig, KVCache, SequenceEncoder

CFG = EncoderConfig(dim=16, layers=2, heads=2, max_len=12, dropout=0.0)
TOL = {"atol": 2e-5, "rtol": 1e-4}


def make_encoder(device: torch.device | str = "cpu", config: EncoderConfig = CFG) -> SequenceEncoder:
    torch.manual_seed(0)
    return SequenceEncoder(config).to(device).eval()


def random_events(
    b: int, length: int, device: torch.device | str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    items = torch.randn(b, length, CFG.dim, generator=gen).to(device)
    actions = torch.randint(0, CFG.num_actions, (b, length), generator=gen).to(device)
    return items, actions


def test_shapes(device: torch.device) -> None:
    enc = make_encoder(device)
    items, actions = random_events(3, 7, device, torch.Generator().manual_seed(1))
    out = enc(items, actions)
    assert out.hidden.shape == (3, 7, 16)
    assert out.query_hidden is not None and out.query_hidden.shape == (3, 7, 16)
    assert out.query_pos.tolist() == [list(range(1, 8))] * 3
    assert len(out.kv.layers) == 2
    for k, v in out.kv.layers:
        assert k.shape == v.shape == (3, 2, 7, 8)
    assert out.kv.next_pos.tolist() == [7, 7, 7]
    assert enc(items, actions, queries=False).query_hidden is None
    some = enc(items, actions, queries=torch.tensor([2, 5]))
    out_all = enc(items, actions)
    torch.testing.assert_close(some.query_hidden, out_all.query_hidden[:, [2, 5]], **TOL)
    assert some.query_pos.tolist() == [[3, 6]] * 3


def test_without_event_hidden_states(device: torch.device) -> None:
    """`hidden=False` (training, scoring) skips the events' last-layer outputs only: the same
    queries and K/V as a full pass."""
    enc = make_encoder(device)
    items, actions = random_events(3, 9, device, torch.Generator().manual_seed(7))
    valid = torch.ones(3, 9, dtype=torch.bool, device=device)
    valid[0, :4] = False
    anchors = torch.tensor([3, 6, 8], device=device)
    full = enc(items, actions, valid, queries=anchors)
    lean = enc(items, actions, valid, queries=anchors, hidden=False)
    assert lean.hidden is None
    torch.testing.assert_close(lean.query_hidden, full.query_hidden, **TOL)
    for (k1, v1), (k2, v2) in zip(full.kv.layers, lean.kv.layers, strict=True):
        torch.testing.assert_close(k2, k1, **TOL)
        torch.testing.assert_close(v2, v1, **TOL)
    kv_only = enc(items, actions, valid, queries=False, hidden=False)
    assert kv_only.hidden is None and kv_only.query_hidden is None
    torch.testing.assert_close(kv_only.kv.layers[-1][0], full.kv.layers[-1][0], **TOL)


def test_causal(device: torch.device) -> None:
    """Changing event j changes nothing at earlier slots, and does change slot j onwards."""
    enc = make_encoder(device)
    items, actions = random_events(2, 9, device, torch.Generator().manual_seed(2))
    base = enc(items, actions)
    j = 5
    items2, actions2 = items.clone(), actions.clone()
    items2[:, j] += 1.0
    actions2[:, j] = (actions2[:, j] + 1) % CFG.num_actions
    changed = enc(items2, actions2)
    torch.testing.assert_close(changed.hidden[:, :j], base.hidden[:, :j], **TOL)
    torch.testing.assert_close(changed.query_hidden[:, :j], base.query_hidden[:, :j], **TOL)
    for (k1, v1), (k2, v2) in zip(base.kv.layers, changed.kv.layers, strict=True):
        torch.testing.assert_close(k2[:, :, :j], k1[:, :, :j], **TOL)
        torch.testing.assert_close(v2[:, :, :j], v1[:, :, :j], **TOL)
    assert (changed.hidden[:, j:] - base.hidden[:, j:]).abs().amax(-1).min() > 1e-4
    assert (changed.query_hidden[:, j:] - base.query_hidden[:, j:]).abs().amax(-1).min() > 1e-4


def _layout(counts: list[int], width: int, gen: torch.Generator) -> torch.Tensor:
    """A valid mask `[B, width]` with counts[b] True slots at random places in row b."""
    rows = []
    for n in counts:
        row = torch.zeros(width, dtype=torch.bool)
        row[torch.randperm(width, generator=gen)[:n]] = True
        rows.append(row)
    return torch.stack(rows)


def _scatter(events: torch.Tensor, valid: torch.Tensor, fill: float) -> torch.Tensor:
    """Place each row's events (in order) at the True slots of `valid`; padding gets `fill`."""
    out = torch.full((*valid.shape, *events.shape[2:]), fill, dtype=events.dtype)
    for b in range(valid.shape[0]):
        n = int(valid[b].sum())
        out[b, valid[b]] = events[b, :n]
    return out


def _per_user(hidden: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    return [hidden[b, valid[b]] for b in range(valid.shape[0])]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_extend_equals_full_recompute(seed: int) -> None:
    """Any chunking, any padding layout (left, right, holes), any start position: same K/V,
    hidden states and query as one full pass over left-padded histories."""
    gen = torch.Generator().manual_seed(seed)
    enc = make_encoder()
    b = int(torch.randint(1, 4, (1,), generator=gen))
    lengths = torch.randint(0, 11, (b,), generator=gen).tolist()
    longest = max(lengths)
    items, actions = random_events(b, max(longest, 1), "cpu", gen)
    start = torch.randint(0, 1000, (b,), generator=gen)

    # Reference: one pass, left-padded.
    ref_valid = torch.stack([torch.arange(longest) >= longest - n for n in lengths])
    ref = enc(_scatter(items, ref_valid, 0.0), _scatter(actions, ref_valid, 0), ref_valid, start)

    # Extension: random cut points per user, each chunk in a random layout with extra padding.
    cache = KVCache.empty(CFG, b, next_pos=start)
    cuts = [sorted(torch.randint(0, n + 1, (2,), generator=gen).tolist()) for n in lengths]
    hidden_per_user: list[list[torch.Tensor]] = [[] for _ in range(b)]
    for c in range(3):
        bounds = [([0] + cut + [n])[c : c + 2] for cut, n in zip(cuts, lengths, strict=True)]
        counts = [hi - lo for lo, hi in bounds]
        width = max(counts) + int(torch.randint(0, 3, (1,), generator=gen))
        valid = _layout(counts, width, gen)
        chunk_items = torch.zeros(b, max(counts), CFG.dim)
        chunk_actions = torch.zeros(b, max(counts), dtype=torch.long)
        for u, (lo, hi) in enumerate(bounds):
            chunk_items[u, : hi - lo] = items[u, lo:hi]
            chunk_actions[u, : hi - lo] = actions[u, lo:hi]
        hidden, cache = enc.extend(
            cache, _scatter(chunk_items, valid, 7.0), _scatter(chunk_actions, valid, 3), valid, capacity=100
        )
        for u, h in enumerate(_per_user(hidden, valid)):
            hidden_per_user[u].append(h)

    assert cache.next_pos.tolist() == (start + torch.tensor(lengths)).tolist()
    for u, h in enumerate(_per_user(ref.hidden, ref_valid)):
        torch.testing.assert_close(torch.cat(hidden_per_user[u]), h, **TOL)
    full = ref.kv.compact(100)
    torch.testing.assert_close(cache.valid, full.valid)
    for (k1, v1), (k2, v2) in zip(full.layers, cache.layers, strict=True):
        torch.testing.assert_close(k2, k1, **TOL)
        torch.testing.assert_close(v2, v1, **TOL)
    torch.testing.assert_close(enc.query(cache), enc.query(ref.kv), **TOL)


def test_query_equals_last_query_slot(device: torch.device) -> None:
    """`query(kv)` reproduces the training pass's user state after the last event, for any
    padding, so a state codec that returns the same K/V gets the same user vector."""
    enc = make_encoder(device)
    items, actions = random_events(3, 8, device, torch.Generator().manual_seed(3))
    valid = torch.ones(3, 8, dtype=torch.bool, device=device)
    valid[0, :3] = False  # left padding
    valid[1, 2] = False  # a hole
    out = enc(items, actions, valid)
    torch.testing.assert_close(enc.query(out.kv), out.query_hidden[:, -1], **TOL)
    assert out.query_pos[:, -1].tolist() == out.kv.next_pos.tolist() == [5, 7, 8]


def test_query_on_empty_history_is_finite(device: torch.device) -> None:
    enc = make_encoder(device)
    user = enc.query(KVCache.empty(CFG, 2, device))
    assert user.shape == (2, 16) and torch.isfinite(user).all()
    torch.testing.assert_close(user[0], user[1])


def test_positions_are_relative(device: torch.device) -> None:
    """RoPE: shifting every position by a constant (a user with a million earlier events)
    changes nothing, so a sliding window never needs re-encoding for positions' sake."""
    enc = make_encoder(device)
    items, actions = random_events(2, 6, device, torch.Generator().manual_seed(4))
    a = enc(items, actions)
    b = enc(items, actions, start_pos=torch.tensor([1_000_000, 37], device=device))
    torch.testing.assert_close(b.hidden, a.hidden, **TOL)
    torch.testing.assert_close(b.query_hidden, a.query_hidden, **TOL)
    assert b.kv.next_pos.tolist() == [1_000_006, 43]


def test_sliding_window(device: torch.device) -> None:
    """Beyond capacity a cache keeps each user's most recent events; positions keep counting."""
    enc = make_encoder(device)
    items, actions = random_events(2, 20, device, torch.Generator().manual_seed(5))
    valid = torch.ones(2, 20, dtype=torch.bool, device=device)
    valid[1, :15] = False  # user 1 has only 5 events

    # One extension past capacity: hidden states are exact, the cache is the full one's tail.
    full = enc(items, actions, valid)
    hidden, window = enc.extend(KVCache.empty(CFG, 2, device), items, actions, valid, capacity=8)
    torch.testing.assert_close(hidden[valid], full.hidden[valid], **TOL)
    assert window.valid.shape == (2, 8) and window.lengths.tolist() == [8, 5]
    assert window.next_pos.tolist() == [20, 5]
    tail = full.kv.compact(8)
    for (k1, _), (k2, _) in zip(tail.layers, window.layers, strict=True):
        torch.testing.assert_close(k2, k1, **TOL)
        torch.testing.assert_close(k2[0], k1[0][:, -8:], **TOL)

    # Event by event with the default capacity (max_len = 12): bounded, finite, well-defined.
    cache = KVCache.empty(CFG, 2, device)
    for t in range(20):
        _, cache = enc.extend(cache, items[:, t : t + 1], actions[:, t : t + 1], valid[:, t : t + 1])
        assert cache.valid.shape[1] <= CFG.max_len
    assert cache.lengths.tolist() == [12, 5] and cache.next_pos.tolist() == [20, 5]
    assert torch.isfinite(enc.query(cache)).all()


def test_compact_rejects_nonpositive_capacity() -> None:
    with pytest.raises(ValueError, match="capacity"):
        KVCache.empty(CFG, 1).compact(0)


def test_deterministic_given_seed(device: torch.device) -> None:
    """Dropout draws from torch's RNG only: the same seed gives the same training pass."""
    cfg = EncoderConfig(dim=16, heads=2, dropout=0.3)
    items, actions = random_events(2, 5, device, torch.Generator().manual_seed(6))
    outs = []
    for _ in range(2):
        torch.manual_seed(42)
        enc = SequenceEncoder(cfg).to(device).train()
        outs.append(enc(items, actions).query_hidden)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
