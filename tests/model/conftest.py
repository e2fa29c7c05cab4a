"""Shared fixtures for the model tests. `LIVEREC_TEST_DEVICE=cuda` runs them on a GPU."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    return torch.device(os.environ.get("LIVEREC_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def one_cpu_thread() -> Iterator[None]:
    """The tensors here are tiny: intra-op threads only add contention on a shared CPU (a test
    took 20x longer with two threads while other processes were busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
