"""A small random model and random histories for the codec tests (CPU, milliseconds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from liverec.model import EncoderConfig, KVCache, ModelConfig, SequentialRecommender

ITEMS = 60
CONFIG = ModelConfig(encoder=EncoderConfig(dim=16, layers=2, heads=2, max_len=12, dropout=0.0))


@pytest.fixture(autouse=True)
def same_config_as_tests() -> None:
    """The test modules size their codecs with this encoder config."""
    assert CONFIG.encoder == EncoderConfig(dim=16, layers=2, heads=2, max_len=12, dropout=0.0)


@pytest.fixture
def model() -> SequentialRecommender:
    torch.manual_seed(0)
    return SequentialRecommender(CONFIG).eval()


@pytest.fixture
def table() -> nn.Embedding:
    torch.manual_seed(1)
    return nn.Embedding(ITEMS, CONFIG.encoder.dim)


def _histories(batch: int, length: int, seed: int = 0, min_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Item ids `[B, length]` and a left-padded valid mask with lengths in [min_len, length]."""
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(ITEMS, (batch, length), generator=gen)
    lengths = torch.randint(min_len, length + 1, (batch,), generator=gen)
    lengths[0] = length  # at least one full row
    valid = torch.arange(length)[None, :] >= (length - lengths)[:, None]
    return items, valid


def _encode(model: SequentialRecommender, table: nn.Embedding, items: torch.Tensor, valid: torch.Tensor) -> KVCache:
    with torch.no_grad():
        return model.encode(table(items), torch.ones_like(items), valid)


@pytest.fixture
def histories():
    """`histories(batch, length, seed=0, min_len=0) -> (items, valid)`."""
    return _histories


@pytest.fixture
def make_cache(model: SequentialRecommender, table: nn.Embedding):
    """`make_cache(batch, length, seed=0, min_len=0) -> KVCache` of random histories."""

    def make(batch: int, length: int, seed: int = 0, min_len: int = 0) -> KVCache:
        items, valid = _histories(batch, length, seed, min_len)
        return _encode(model, table, items, valid)

    return make
