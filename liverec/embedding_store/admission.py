"""Frequency filtering: a count-min sketch counts the keys that have no row yet.

Why a sketch: most feature ids in a recommender stream are seen once or twice. Giving each a row
(dim weights + optimizer state) wastes memory on ids that never get trained enough to matter;
counting them exactly would cost a dict entry each. A count-min sketch counts them in a fixed
`depth x width` array of int32 counters, whatever the number of distinct keys.

Error bound (Cormode & Muthukrishnan, 2005): with `width = ceil(e / epsilon)` (rounded up here to a
power of two, which only tightens it) and `depth = ceil(ln(1 / delta))`, after N additions in
total, every estimate satisfies

    true count  <=  estimate  <=  true count + epsilon * N     with probability >= 1 - delta

(per key, over the choice of hash functions). The estimate never undercounts, so a key is never
admitted late; it may be admitted early, by at most epsilon * N occurrences, with probability at
most delta. The rows use splitmix64 with independent per-row seeds in place of a pairwise
independent family; tests/embedding_store/test_admission.py checks the bound empirically.

Counters saturate at 2**30 (far above any admission threshold) so they never overflow int32.
A key's counts stay in the sketch after it is admitted: if its row later expires, it is
re-admitted on its next lookup, which is what a once-frequent id deserves.
"""

from __future__ import annotations

import math

import torch

from liverec.embedding_store.hashing import derive_seed, splitmix64

COUNTER_CAP = 2**30


class CountMinSketch:
    """A depth x width count-min sketch over int64 keys, on one device."""

    def __init__(self, epsilon: float, delta: float, *, seed: int, device: torch.device | str = "cpu") -> None:
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.epsilon = epsilon
        self.delta = delta
        self.width = 1 << (math.ceil(math.e / epsilon) - 1).bit_length()
        self.depth = math.ceil(math.log(1.0 / delta))
        self.device = torch.device(device)
        self.counters = torch.zeros(self.depth * self.width, dtype=torch.int32, device=self.device)
        self._row_seeds = torch.tensor(
            [derive_seed(seed, "count-min", str(row)) for row in range(self.depth)],
            dtype=torch.int64, device=self.device,
        ).unsqueeze(1)
        self._row_offsets = (
            torch.arange(self.depth, dtype=torch.int64, device=self.device) * self.width
        ).unsqueeze(1)
        self.total = 0

    @property
    def nbytes(self) -> int:
        return self.counters.numel() * self.counters.element_size()

    def _cells(self, keys: torch.Tensor) -> torch.Tensor:
        """(depth, n) flat counter indices: one cell per row for each key."""
        return (splitmix64(keys.unsqueeze(0) ^ self._row_seeds) & (self.width - 1)) + self._row_offsets

    def add_and_estimate(self, keys: torch.Tensor) -> torch.Tensor:
        """Count every occurrence in `keys` (duplicates count each time), then estimate each key."""
        if keys.numel() > COUNTER_CAP:
            raise ValueError(f"a batch of {keys.numel()} keys could overflow int32 counters")
        cells = self._cells(keys).flatten()
        self.counters.index_add_(0, cells, torch.ones_like(cells, dtype=torch.int32))
        counts = self.counters[cells].clamp_max_(COUNTER_CAP)
        self.counters[cells] = counts
        self.total += keys.numel()
        return counts.view(self.depth, -1).amin(dim=0).long()

    def estimate(self, keys: torch.Tensor) -> torch.Tensor:
        """Estimated count of each key (never below its true count)."""
        return self.counters[self._cells(keys)].amin(dim=0).long()

    def load_state(self, counters: torch.Tensor, total: int) -> None:
        """Restore counters saved from a sketch of the same epsilon and delta."""
        if counters.shape != self.counters.shape:
            raise ValueError(f"sketch counters have shape {tuple(counters.shape)}, expected {tuple(self.counters.shape)}")
        self.counters.copy_(counters)
        self.total = total
