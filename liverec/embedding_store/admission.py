"""Frequency filtering: a count-min sketch counts the keys that have no row yet.

Why a sketch: most feature ids in a recommender stream are seen once or twice. Giving each a row
(dim weights + optimizer state) wastes memory on ids that never get trained enough to matter;
counting them exactly would cost a dict entry each. A count-min sketch counts them in a fixed
`depth x width` array of counters, whatever the number of distinct keys.

Error bound (Cormode & Muthukrishnan, 2005): with `width = ceil(e / epsilon)` (rounded up here to a
power of two, which only tightens it) and `depth = ceil(ln(1 / delta))`, after N additions in
total, every estimate satisfies

    min(true count, 255)  <=  estimate  <=  true count + epsilon * N     with probability >= 1 - delta

(per key, over the choice of hash functions). The estimate never undercounts a count below the
counters' cap, so a key is never admitted late; it may be admitted early, by at most epsilon * N
occurrences, with probability at most delta. The proof assumes pairwise-independent row hashes;
here row i uses h1 + i * h2 from one splitmix64 hash (double hashing), so
tests/embedding_store/test_store_admission.py checks the bound empirically. Note N grows with the
stream: the absolute slack epsilon * N does too, so size epsilon for the number of occurrences of
not-yet-admitted keys the table will see between restarts (the sketch is the table's admission
budget, not a per-row cost: its bytes do not grow with rows).

Counters are as narrow as the admission threshold allows and saturate at `cap`: admission only
asks whether an estimate reached `min_count`, and min(x, cap) >= m exactly when x >= m for
m <= cap, so saturation never changes an admission decision. A table passes its min_count as
`max_count`, and the counters take the fewest bits (2, 4 or 8, packed little-end first into
uint8 bytes) whose cap 2**bits - 1 is at least that: 2 bits (cap 3) for min_count <= 3, 4 bits
(cap 15) up to 15, 8 bits (cap COUNTER_CAP = 255) up to 255 (see config.py). So the lower bound
above reads min(true count, cap). A default table (epsilon 1e-5: width 2**19; delta 0.01:
depth 5) with min_count 2 holds 5 x 2**19 two-bit counters, 655 KB, where one byte per counter
took 2.6 MB for the same error bound. `estimate` of a key seen more than `cap` times says `cap`
(`Table.frequency` of a key without a row therefore too); the table only asks the sketch about
keys without a row. Updates are exact saturating sums: a batch's increments are summed per cell
in int32 first.
A key's counts stay in the sketch after it is admitted: if its row later expires, it is
re-admitted on its next lookup, which is what a once-frequent id deserves.
"""

from __future__ import annotations

import math

import torch

from liverec.embedding_store.hashing import derive_seed, shift_right_logical, splitmix64
from liverec.embedding_store.kernels import cpu_step

COUNTER_CAP = 255
COUNTER_DTYPE = torch.uint8


class CountMinSketch:
    """A depth x width count-min sketch over int64 keys, on one device."""

    def __init__(self, epsilon: float, delta: float, *, seed: int, device: torch.device | str = "cpu",
                 max_count: int = COUNTER_CAP) -> None:
        if not 1 <= max_count <= COUNTER_CAP:
            raise ValueError(f"max_count must be in [1, {COUNTER_CAP}], got {max_count}")
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.epsilon = epsilon
        self.delta = delta
        self.width = 1 << (math.ceil(math.e / epsilon) - 1).bit_length()
        self.depth = math.ceil(math.log(1.0 / delta))
        self.bits = next(bits for bits in (2, 4, 8) if 2**bits - 1 >= max_count)
        self.cap = 2**self.bits - 1
        self._per_byte_log2 = (8 // self.bits).bit_length() - 1
        self.device = torch.device(device)
        # width >= 4 (a power of two >= e / epsilon > 2.7), so the cells fill whole bytes.
        self.counters = torch.zeros(self.depth * self.width * self.bits // 8, dtype=COUNTER_DTYPE, device=self.device)
        self._seed = derive_seed(seed, "count-min")
        self._row_numbers = torch.arange(self.depth, dtype=torch.int64, device=self.device).unsqueeze(1)
        self._row_offsets = self._row_numbers * self.width
        self.total = 0

    @property
    def nbytes(self) -> int:
        return self.counters.numel() * self.counters.element_size()

    def _cells(self, keys: torch.Tensor) -> torch.Tensor:
        """(depth, n) flat counter indices: cell (h1 + i * h2) mod width in row i, from one
        splitmix64 hash per key (double hashing, Kirsch & Mitzenmacher: the same asymptotic
        guarantees as independent hashes, at one hash per key instead of one per row)."""
        h = splitmix64(keys ^ self._seed)
        first = (h & (self.width - 1)).unsqueeze(0)
        step = (shift_right_logical(h, 32) | 1).unsqueeze(0)
        return ((first + self._row_numbers * step) & (self.width - 1)) + self._row_offsets

    def add_and_estimate(self, keys: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """Add each key `counts` times (once each if None; duplicate keys add up), then return
        each key's estimate. The caller that has already deduplicated passes the counts, which
        touches depth cells per distinct key instead of per occurrence."""
        added = keys.numel() if counts is None else int(counts.sum())
        if self.device.type == "cpu" and counts is not None:  # distinct keys: the compiled pass
            self.total += added
            return cpu_step.sketch_add_estimate(self.counters, keys, counts, seed=self._seed, width=self.width,
                                                depth=self.depth, bits=self.bits)
        cells = self._cells(keys).flatten()
        increments = (
            torch.ones_like(cells, dtype=torch.int32) if counts is None
            else counts.to(torch.int32).clamp_max(self.cap).expand(self.depth, -1).flatten()
        )
        touched, inverse = torch.unique(cells, return_inverse=True)
        summed = torch.zeros(touched.numel(), dtype=torch.int32, device=self.device).index_add_(0, inverse, increments)
        old = self._read(touched)
        updated = summed.add_(old).clamp_max_(self.cap)
        self._write(touched, old, updated)
        self.total += added
        return updated.index_select(0, inverse).view(self.depth, -1).amin(dim=0).long()

    def kernel_arguments(self) -> tuple[torch.Tensor, int, int, int, int]:
        """(counters, seed, width, depth, bits): what a compiled CPU kernel needs to count and
        estimate with this sketch's cells (`cpu_step.admission_candidates`); it adds to the
        counters in place, and the caller adds what it counted to `total`."""
        return self.counters, self._seed, self.width, self.depth, self.bits

    def estimate(self, keys: torch.Tensor) -> torch.Tensor:
        """Estimated count of each key (never below min(true count, cap))."""
        cells = self._cells(keys)
        return self._read(cells.flatten()).view(cells.shape).amin(dim=0).long()

    def _read(self, cells: torch.Tensor) -> torch.Tensor:
        """int32 value of each cell (unpacked from its byte)."""
        shift = ((cells & ((1 << self._per_byte_log2) - 1)) * self.bits).to(torch.int32)
        packed = self.counters.index_select(0, cells >> self._per_byte_log2).to(torch.int32)
        return (packed >> shift) & self.cap

    def _write(self, cells: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
        """Raise distinct `cells` from `old` to `new` (new >= old, both <= cap). Cells sharing a
        byte occupy disjoint bit fields, so their raises add into the byte without carries."""
        shift = ((cells & ((1 << self._per_byte_log2) - 1)) * self.bits).to(torch.int32)
        raised = (new - old) << shift
        byte_index, inverse = torch.unique(cells >> self._per_byte_log2, return_inverse=True)
        packed = self.counters.index_select(0, byte_index).to(torch.int32).index_add_(0, inverse, raised)
        self.counters.index_copy_(0, byte_index, packed.to(COUNTER_DTYPE))

    def load_state(self, counters: torch.Tensor, total: int) -> None:
        """Restore counters saved from a sketch of the same epsilon, delta and counter width."""
        if counters.dtype != COUNTER_DTYPE:
            raise ValueError(f"sketch counters are {counters.dtype}, expected {COUNTER_DTYPE}")
        if counters.shape != self.counters.shape:
            raise ValueError(f"sketch counters have shape {tuple(counters.shape)}, expected {tuple(self.counters.shape)}")
        self.counters.copy_(counters)
        self.total = total
