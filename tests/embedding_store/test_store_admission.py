"""Count-min sketch: sizing, never undercounting, and the documented error bound, empirically."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from liverec.embedding_store import CountMinSketch
from liverec.embedding_store.admission import COUNTER_CAP


def _zipf_stream(n: int, universe: int, exponent: float, seed: int) -> torch.Tensor:
    ranks = np.arange(1, universe + 1, dtype=np.float64)
    weights = ranks**-exponent
    rng = np.random.default_rng(seed)
    samples = rng.choice(universe, size=n, p=weights / weights.sum())
    ids = rng.integers(-(2**62), 2**62, size=universe)
    return torch.from_numpy(ids[samples])


def test_width_and_depth_follow_epsilon_and_delta() -> None:
    sketch = CountMinSketch(0.01, 0.01, seed=0)
    assert sketch.width == 512 >= math.e / 0.01
    assert sketch.depth == math.ceil(math.log(100))
    assert sketch.nbytes == 512 * 5  # uint8 counters


def test_estimates_never_undercount_and_duplicates_count_each_time() -> None:
    sketch = CountMinSketch(0.05, 0.1, seed=1)
    stream = _zipf_stream(20_000, 3_000, 1.1, seed=2)
    for batch in stream.split(1000):
        sketch.add_and_estimate(batch)
    keys, counts = torch.unique(stream, return_counts=True)
    assert bool((sketch.estimate(keys) >= counts.clamp_max(COUNTER_CAP)).all())
    assert int(counts.max()) > COUNTER_CAP, "the stream must saturate some counter (else the cap is untested)"
    assert sketch.total == stream.numel()
    fresh = CountMinSketch(0.05, 0.1, seed=1)
    assert fresh.add_and_estimate(torch.tensor([7, 7, 7, 9])).tolist()[:3] == [3, 3, 3]


@pytest.mark.parametrize("epsilon,delta", [(0.01, 0.01), (0.002, 0.05)])
def test_error_bound_holds_empirically(epsilon: float, delta: float) -> None:
    """P(estimate - true > epsilon * N) <= delta, per key: over every distinct key of a skewed
    stream, the fraction over the bound must not exceed delta; and no estimate is below
    min(true, 255), the lower bound with saturating counters."""
    sketch = CountMinSketch(epsilon, delta, seed=3)
    stream = _zipf_stream(200_000, 50_000, 1.05, seed=4)
    for batch in stream.split(8192):
        sketch.add_and_estimate(batch)
    keys, counts = torch.unique(stream, return_counts=True)
    estimates = sketch.estimate(keys)
    assert bool((estimates >= counts.clamp_max(COUNTER_CAP)).all())
    errors = estimates - counts
    over = float((errors > epsilon * stream.numel()).float().mean())
    assert over <= delta, f"{over:.4f} of keys exceed the bound"
    assert int(errors.max()) > 0, "a sketch this small must collide somewhere (else the test proves nothing)"
    for max_count in (2, 9):  # narrower counters: the same estimates, capped, so the same bound and decisions
        narrow = CountMinSketch(epsilon, delta, seed=3, max_count=max_count)
        for batch in stream.split(8192):
            narrow.add_and_estimate(batch)
        assert torch.equal(narrow.estimate(keys), estimates.clamp_max(narrow.cap))


def test_counters_saturate_instead_of_overflowing() -> None:
    sketch = CountMinSketch(0.5, 0.5, seed=0)
    sketch.counters.fill_(COUNTER_CAP - 1)
    assert sketch.add_and_estimate(torch.tensor([1, 1, 1])).tolist() == [COUNTER_CAP] * 3
    assert int(sketch.counters.max()) == COUNTER_CAP
    fresh = CountMinSketch(0.5, 0.5, seed=0)
    assert fresh.add_and_estimate(torch.tensor([5]), torch.tensor([1000])).tolist() == [COUNTER_CAP]
    assert fresh.add_and_estimate(torch.tensor([5, 6]), torch.tensor([300, 2])).tolist()[0] == COUNTER_CAP


def test_saturation_never_changes_an_admission_decision() -> None:
    """With min_count <= 255, a capped estimate reaches min_count exactly when the uncapped one
    would: sums are taken in int32 per batch and capped once."""
    sketch = CountMinSketch(0.5, 0.5, seed=0)
    sketch.counters.fill_(200)
    estimates = sketch.add_and_estimate(torch.tensor([1, 2]), torch.tensor([54, 55]))
    assert bool((estimates >= 254).all()) and bool((estimates <= COUNTER_CAP).all())


@pytest.mark.parametrize("epsilon,delta", [(0.0, 0.1), (1.0, 0.1), (0.1, 0.0), (0.1, 1.5)])
def test_invalid_parameters_are_refused(epsilon: float, delta: float) -> None:
    with pytest.raises(ValueError, match="epsilon|delta"):
        CountMinSketch(epsilon, delta, seed=0)


def test_load_state_checks_the_shape() -> None:
    sketch = CountMinSketch(0.1, 0.1, seed=0)
    with pytest.raises(ValueError, match="shape"):
        sketch.load_state(torch.zeros(3, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="uint8"):
        sketch.load_state(torch.zeros(sketch.counters.shape, dtype=torch.int32), 0)


@pytest.mark.parametrize("max_count,bits", [(2, 2), (3, 2), (4, 4), (15, 4), (16, 8), (255, 8)])
def test_counters_are_as_narrow_as_the_threshold_allows(max_count: int, bits: int) -> None:
    sketch = CountMinSketch(0.01, 0.01, seed=0, max_count=max_count)
    assert (sketch.bits, sketch.cap) == (bits, 2**bits - 1)
    assert sketch.nbytes == 512 * 5 * bits // 8


@pytest.mark.parametrize("max_count", [2, 9, 200])
def test_packed_counters_match_exact_saturating_counts(max_count: int) -> None:
    """Packed cells (several a byte) hold exactly min(sum of their keys' counts, cap): the compiled
    path (distinct keys with counts) and the torch path (repeated keys, the one CUDA runs) agree
    with a per-cell dict, so neighbouring cells of one byte never disturb each other."""
    compiled = CountMinSketch(0.05, 0.1, seed=4, max_count=max_count)
    torch_path = CountMinSketch(0.05, 0.1, seed=4, max_count=max_count)
    cells: dict[int, int] = {}
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch = torch.randint(0, 400, (64,), generator=generator) * 7919 - 10**12
        distinct, counts = torch.unique(batch, return_counts=True)
        got = compiled.add_and_estimate(distinct, counts)
        torch_got = torch_path.add_and_estimate(batch)
        for key, count in zip(distinct.tolist(), counts.tolist()):
            for cell in compiled._cells(torch.tensor([key])).flatten().tolist():
                cells[cell] = cells.get(cell, 0) + count
        want = [min(min(cells[c] for c in compiled._cells(torch.tensor([k])).flatten().tolist()), compiled.cap)
                for k in distinct.tolist()]
        assert got.tolist() == want
        assert torch.equal(torch_got, compiled.estimate(batch))
    assert torch.equal(compiled.counters, torch_path.counters)
    assert max(cells.values()) > compiled.cap or max_count == 200  # saturation exercised
