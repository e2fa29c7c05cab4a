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
    assert sketch.nbytes == 512 * 5 * 4


def test_estimates_never_undercount_and_duplicates_count_each_time() -> None:
    sketch = CountMinSketch(0.05, 0.1, seed=1)
    stream = _zipf_stream(20_000, 3_000, 1.1, seed=2)
    for batch in stream.split(1000):
        sketch.add_and_estimate(batch)
    keys, counts = torch.unique(stream, return_counts=True)
    assert bool((sketch.estimate(keys) >= counts).all())
    assert sketch.total == stream.numel()
    fresh = CountMinSketch(0.05, 0.1, seed=1)
    assert fresh.add_and_estimate(torch.tensor([7, 7, 7, 9])).tolist()[:3] == [3, 3, 3]


@pytest.mark.parametrize("epsilon,delta", [(0.01, 0.01), (0.002, 0.05)])
def test_error_bound_holds_empirically(epsilon: float, delta: float) -> None:
    """P(estimate - true > epsilon * N) <= delta, per key: over every distinct key of a skewed
    stream, the fraction over the bound must not exceed delta."""
    sketch = CountMinSketch(epsilon, delta, seed=3)
    stream = _zipf_stream(200_000, 50_000, 1.05, seed=4)
    for batch in stream.split(8192):
        sketch.add_and_estimate(batch)
    keys, counts = torch.unique(stream, return_counts=True)
    errors = sketch.estimate(keys) - counts
    over = float((errors > epsilon * stream.numel()).float().mean())
    assert over <= delta, f"{over:.4f} of keys exceed the bound"
    assert int(errors.max()) > 0, "a sketch this small must collide somewhere (else the test proves nothing)"


def test_counters_saturate_instead_of_overflowing() -> None:
    sketch = CountMinSketch(0.5, 0.5, seed=0)
    sketch.counters.fill_(COUNTER_CAP - 1)
    assert sketch.add_and_estimate(torch.tensor([1, 1, 1])).tolist() == [COUNTER_CAP] * 3
    assert int(sketch.counters.max()) == COUNTER_CAP


@pytest.mark.parametrize("epsilon,delta", [(0.0, 0.1), (1.0, 0.1), (0.1, 0.0), (0.1, 1.5)])
def test_invalid_parameters_are_refused(epsilon: float, delta: float) -> None:
    with pytest.raises(ValueError, match="epsilon|delta"):
        CountMinSketch(epsilon, delta, seed=0)


def test_load_state_checks_the_shape() -> None:
    sketch = CountMinSketch(0.1, 0.1, seed=0)
    with pytest.raises(ValueError, match="shape"):
        sketch.load_state(torch.zeros(3, dtype=torch.int32), 0)
