"""Deterministic row initialisation: a pure function of (seed, table, key), with the right law."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from liverec.embedding_store import TableConfig
from liverec.embedding_store.hashing import derive_seed
from liverec.embedding_store.initializer import initial_rows

KEYS = torch.randint(-(2**62), 2**62, (20_000,), generator=torch.Generator().manual_seed(0))


def test_a_row_depends_only_on_its_key_not_the_batch() -> None:
    config = TableConfig("item", 8)
    whole = initial_rows(config, 11, KEYS)
    reversed_batch = initial_rows(config, 11, KEYS.flip(0)).flip(0)
    assert torch.equal(whole, reversed_batch)
    assert torch.equal(initial_rows(config, 11, KEYS[5:6]), whole[5:6])


def test_seed_and_table_change_the_rows() -> None:
    config = TableConfig("item", 8)
    base = initial_rows(config, derive_seed(0, "item"), KEYS[:100])
    assert not torch.equal(base, initial_rows(config, derive_seed(1, "item"), KEYS[:100]))
    assert not torch.equal(base, initial_rows(config, derive_seed(0, "user"), KEYS[:100]))
    assert derive_seed(0, "item") == derive_seed(0, "item")


def test_normal_rows_have_mean_zero_and_std_init_scale() -> None:
    rows = initial_rows(TableConfig("t", 64, init_scale=0.5), 3, KEYS)
    assert abs(float(rows.mean())) < 0.01
    assert abs(float(rows.std()) - 0.5) < 0.01
    correlation = torch.corrcoef(torch.stack([rows[:, 0], rows[:, 1], rows[:, 63]]))
    assert float((correlation - torch.eye(3)).abs().max()) < 0.05


def test_uniform_rows_fill_the_interval() -> None:
    rows = initial_rows(TableConfig("t", 7, initializer="uniform", init_scale=0.2), 3, KEYS)
    assert rows.shape == (KEYS.numel(), 7)
    assert float(rows.min()) >= -0.2 and float(rows.max()) <= 0.2
    assert float(rows.min()) < -0.19 and float(rows.max()) > 0.19
    assert abs(float(rows.std()) - 0.2 / 3**0.5) < 0.005


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_zeros_odd_dims_and_dtypes(dtype: str) -> None:
    config = TableConfig("t", 5, dtype=dtype)
    rows = initial_rows(config, 1, KEYS[:10])
    assert rows.shape == (10, 5) and rows.dtype == config.torch_dtype and bool(rows.any())
    zeros = initial_rows(dataclasses.replace(config, initializer="zeros"), 1, KEYS[:10])
    assert not bool(zeros.any())


def test_compiled_uniforms_are_the_torch_ops_bit_for_bit() -> None:
    """The CPU builds initial rows from a compiled pass; CUDA from the torch ops: same bits."""
    from liverec.embedding_store.initializer import _uniforms, _uniforms_torch

    keys = torch.cat([KEYS, torch.tensor([-(2**63) + 2, 2**63 - 1, 0, -1])])
    for seed in (0, derive_seed(5, "item"), -(2**63)):
        assert torch.equal(_uniforms(keys, 65, seed), _uniforms_torch(keys, 65, seed))


def test_normal_pairs_of_every_24_bit_uniform_compiled_and_torch_agree_bit_for_bit() -> None:
    """Every radius uniform and every angle uniform once (the angle sweep reversed against the
    radius sweep): the compiled pair (the CPU store's new rows) equals the torch ops (CUDA's,
    and `initial_rows`') bit for bit, and both are within 2e-6 of float64 Box-Muller."""
    import numba
    import numpy as np

    from liverec.embedding_store import box_muller
    from liverec.embedding_store.kernels import cpu_step

    @numba.njit
    def compiled(radius_bits: np.ndarray, angle_bits: np.ndarray, scale: np.float32, first: np.ndarray,
                 second: np.ndarray) -> None:
        for i in range(radius_bits.shape[0]):
            first[i], second[i] = cpu_step._normal_pair(radius_bits[i], angle_bits[i], scale)

    radius_bits = np.arange(2**24, dtype=np.uint64)
    angle_bits = radius_bits[::-1].copy()
    first, second = np.empty(2**24, dtype=np.float32), np.empty(2**24, dtype=np.float32)
    compiled(radius_bits, angle_bits, np.float32(0.5), first, second)
    u_radius = torch.from_numpy(radius_bits.astype(np.float32)) * float(box_muller.UNIT)
    u_angle = torch.from_numpy(angle_bits.astype(np.float32)) * float(box_muller.UNIT)
    torch_first, torch_second = box_muller.normal_pairs(u_radius, u_angle, 0.5)
    assert torch.equal(torch.from_numpy(first).view(torch.int32), torch_first.view(torch.int32))
    assert torch.equal(torch.from_numpy(second).view(torch.int32), torch_second.view(torch.int32))
    radius = torch.sqrt(-2.0 * torch.log(u_radius.double() + 2.0**-24)) * 0.5
    angle = 2.0 * math.pi * u_angle.double()
    assert float((torch_first.double() - radius * torch.cos(angle)).abs().max()) < 2e-6
    assert float((torch_second.double() - radius * torch.sin(angle)).abs().max()) < 2e-6


def test_rounded_sqrt_is_correctly_rounded() -> None:
    """Against numpy's float64 sqrt (IEEE, correctly rounded) rounded once to float32, which is
    the correctly rounded float32 root (53 >= 2 * 24 + 2 bits)."""
    import numpy as np

    from liverec.embedding_store.box_muller import rounded_sqrt

    y = torch.rand(200_000, generator=torch.Generator().manual_seed(4)) * 40
    y = torch.cat([y, torch.tensor([0.0, 1.0, 4.0, 2.0**-126, 3.4e38])])
    expected = torch.from_numpy(np.sqrt(y.double().numpy()).astype(np.float32))
    assert torch.equal(rounded_sqrt(y), expected)
