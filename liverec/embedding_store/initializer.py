"""Deterministic row initialisation from (seed, table, key).

A new row's initial weights are a pure function of the store seed, the table name and the key,
never of a global RNG state or of the order in which keys arrived. So replaying a stream, or
re-creating a row after it expired, or restoring a checkpoint and continuing, creates identical
rows — and CPU and CUDA agree bit for bit, since the bits come from integer hashing (splitmix64
in torch ops), not from a device RNG, and the normals from float32 arithmetic that rounds the
same everywhere (`box_muller`), not from a math library.

Each row needs `dim` numbers. A key's 64-bit seed is splitmix64(key ^ table_seed); number j
of its row is the murmur3 32-bit finaliser of (seed_low + j * golden) ^ seed_high, computed in
int32 (which torch vectorises, unlike int64 multiplies) with in-place ops on one (n, dim) buffer,
because large temporaries are what dominates element-wise work on a CPU. Each 32-bit hash gives a
24-bit uniform; "normal" turns consecutive pairs into two normals by Box-Muller
(`box_muller.normal_pairs`), "uniform" uses them directly.
"""

from __future__ import annotations

import torch

from liverec.embedding_store import box_muller
from liverec.embedding_store.config import TableConfig
from liverec.embedding_store.hashing import as_int32, shift_right_logical, splitmix64
from liverec.embedding_store.kernels import cpu_step

_GOLDEN32 = as_int32(0x9E3779B9)
_FMIX1 = as_int32(0x85EBCA6B)
_FMIX2 = as_int32(0xC2B2AE35)
_UNIT = 2.0**-24


def _fmix32_(h: torch.Tensor, scratch: torch.Tensor) -> None:
    """murmur3's 32-bit finaliser, in place on int32 `h` (scratch: a buffer of h's shape)."""
    for shift, multiplier in ((16, _FMIX1), (13, _FMIX2), (16, None)):
        torch.bitwise_right_shift(h, shift, out=scratch)
        scratch &= (1 << (32 - shift)) - 1
        h ^= scratch
        if multiplier is not None:
            h *= multiplier


def _uniforms(keys: torch.Tensor, count: int, table_seed: int) -> torch.Tensor:
    """(n, count) float32 uniforms in [0, 1), element j of row i a function of (table_seed, keys[i], j).
    On the CPU the same bits come from one compiled pass (`cpu_step.uniforms`)."""
    if keys.device.type == "cpu":
        return cpu_step.uniforms(keys, count, table_seed)
    return _uniforms_torch(keys, count, table_seed)


def _uniforms_torch(keys: torch.Tensor, count: int, table_seed: int) -> torch.Tensor:
    seed = splitmix64(keys ^ table_seed)
    low = seed.to(torch.int32).unsqueeze(1)
    high = shift_right_logical(seed, 32).to(torch.int32).unsqueeze(1)
    h = torch.arange(count, dtype=torch.int32, device=keys.device) * _GOLDEN32 + low
    h ^= high
    _fmix32_(h, torch.empty_like(h))
    h >>= 8
    h &= 0xFFFFFF
    return h.to(torch.float32).mul_(_UNIT)


def initial_rows(config: TableConfig, table_seed: int, keys: torch.Tensor) -> torch.Tensor:
    """Initial weights (len(keys), dim) of `config`'s dtype for `keys`; row i depends only on keys[i]."""
    n, dim = keys.numel(), config.dim
    if config.initializer == "zeros":
        return torch.zeros(n, dim, dtype=config.torch_dtype, device=keys.device)
    if config.initializer == "uniform":
        values = _uniforms(keys, dim, table_seed).mul_(2.0 * config.init_scale).sub_(config.init_scale)
        return values.to(config.torch_dtype)
    pairs = (dim + 1) // 2
    uniforms = _uniforms(keys, 2 * pairs, table_seed).view(n, pairs, 2)
    first, second = box_muller.normal_pairs(uniforms[:, :, 0], uniforms[:, :, 1], config.init_scale)
    return torch.stack([first, second], dim=2).view(n, 2 * pairs)[:, :dim].to(config.torch_dtype)


def write_initial_rows(config: TableConfig, table_seed: int, keys: torch.Tensor, weights: torch.Tensor,
                       rows: torch.Tensor) -> None:
    """weights[rows] = initial_rows(config, table_seed, keys), bit for bit. On the CPU with
    float32 weights the values are written straight into the rows by compiled kernels, without
    the (n, dim) temporaries and the dozen passes over them."""
    if weights.device.type == "cpu" and weights.dtype == torch.float32 and config.initializer != "zeros":
        write = cpu_step.write_normal_rows if config.initializer == "normal" else cpu_step.write_uniform_rows
        write(weights, rows, keys, table_seed, config.init_scale)
        return
    weights.index_copy_(0, rows, initial_rows(config, table_seed, keys))
