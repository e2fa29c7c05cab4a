"""Shared fixtures for the model tests. `LIVEREC_TEST_DEVICE=cuda` runs them on a GPU."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    return torch.device(os.environ.get("LIVEREC_TEST_DEVICE", "cpu"))
