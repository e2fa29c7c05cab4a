"""Counter-based hashing of int64 keys in plain torch ops, identical on every device.

Row initialisation and the count-min sketch both need a hash of a key that is a pure function
of (seed, key), so that a replay — or the same key on another device — yields the same bits.
splitmix64 is used because it is cheap (two multiplies) and a full-avalanche 64-bit mixer.
torch has no unsigned 64-bit arithmetic, so the mixer runs on int64: multiplication and addition
wrap the same way in two's complement, and the unsigned right shift is an arithmetic shift
followed by a mask that clears the sign-extended bits.
"""

from __future__ import annotations

import hashlib

import torch

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def as_int64(value: int) -> int:
    """The int64 with the same low 64 bits as `value` (torch scalars must fit int64)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def as_int32(value: int) -> int:
    """The int32 with the same low 32 bits as `value`."""
    value &= (1 << 32) - 1
    return value - (1 << 32) if value >= 1 << 31 else value


def shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned right shift of int64 values: the top `bits` bits come out zero."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 of each int64 element (same bits as the uint64 reference implementation)."""
    z = x + as_int64(_GOLDEN)
    z = (z ^ shift_right_logical(z, 30)) * as_int64(_MIX1)
    z = (z ^ shift_right_logical(z, 27)) * as_int64(_MIX2)
    return z ^ shift_right_logical(z, 31)


def derive_seed(seed: int, *names: str) -> int:
    """A stable int64 seed from a base seed and names (e.g. a table name), independent of
    Python's per-process string hashing."""
    digest = hashlib.blake2b(repr((seed, names)).encode(), digest_size=8).digest()
    return as_int64(int.from_bytes(digest, "little"))
