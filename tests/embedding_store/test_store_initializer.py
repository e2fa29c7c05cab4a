"""Deterministic row initialisation: a pure function of (seed, table, key), with the right law."""

from __future__ import annotations

import dataclasses

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
