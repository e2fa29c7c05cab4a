"""Codec configs: validated on construction, errors name the field."""

from __future__ import annotations

import pytest

from liverec.model import EncoderConfig, ModelConfig
from liverec.model.codecs import (
    CONFIGS,
    CollectiveCodec,
    FullCodec,
    Int8Codec,
    PagesCodec,
    SummaryCodec,
    WindowCodec,
    codec_config,
    codec_from_config,
)

ENC = EncoderConfig(dim=16, layers=2, heads=2, max_len=12, dropout=0.0)


def test_every_codec_builds_with_defaults() -> None:
    kinds = {"full": FullCodec, "int8": Int8Codec, "window": WindowCodec, "pages": PagesCodec,
             "summary": SummaryCodec, "collective": CollectiveCodec}
    assert set(CONFIGS) == set(kinds)
    for name, cls in kinds.items():
        codec = codec_from_config(name, ENC)
        assert type(codec) is cls and codec.codec_id == name and codec.version == 1
        assert codec.cost.refresh and codec.cost.serve
        assert codec.describe()["incremental"] == codec.incremental
    assert codec_from_config("window", ModelConfig(encoder=ENC), window=3).window == 3


def test_learned_codecs_expose_modules_sized_by_the_encoder() -> None:
    summary = codec_from_config("summary", ENC, tokens=5)
    assert summary.module.queries.shape == (ENC.layers, 5, ENC.heads, ENC.head_dim)
    collective = codec_from_config("collective", ENC, pool_size=300, rank=3, groups=1)
    assert collective.module.pool.shape == (1, 300, ENC.layers * 2 * ENC.dim)
    assert collective.index_bytes == 2 and collective.pos_bytes == 2 + 3
    grouped = codec_from_config("collective", ENC, pool_size=256, rank=3, groups=4)
    assert grouped.module.pool.shape == (4, 256, ENC.layers * 2 * ENC.dim // 4)
    assert grouped.index_bytes == 1 and grouped.pos_bytes == 4 + 3
    assert codec_from_config("full", ENC).module is None


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("window", {"window": 0}, r"codecs\.window\.window: must be >= 1, got 0"),
        ("window", {"window": 2.5}, r"codecs\.window\.window: must be an integer"),
        ("window", {"window": True}, r"codecs\.window\.window: must be an integer"),
        ("full", {"dtype": "int4"}, r"codecs\.full\.dtype: must be one of"),
        ("full", {"capacity": 0}, r"codecs\.full\.capacity: must be >= 1"),
        ("int8", {"capacity": -1}, r"codecs\.int8\.capacity: must be >= 1"),
        ("pages", {"page_size": 0}, r"codecs\.pages\.page_size: must be >= 1"),
        ("pages", {"pages": 2, "recent_pages": 3}, r"codecs\.pages\.recent_pages: must be <= 2, got 3"),
        ("summary", {"tokens": 0}, r"codecs\.summary\.tokens: must be >= 1"),
        ("collective", {"pool_size": 70_000}, r"codecs\.collective\.pool_size: must be <= 65536"),
        ("collective", {"rank": 0}, r"codecs\.collective\.rank: must be >= 1"),
        ("collective", {"ranks": 4},
         r"codecs\.collective\.ranks: unknown field; collective takes \['groups', 'pool_size', 'rank'\]"),
        ("collective", {"groups": 3}, r"codecs\.collective\.groups: must divide layers \* 2 \* dim = 64, got 3"),
        ("collective", {"groups": 0}, r"codecs\.collective\.groups: must be >= 1"),
        ("int8", {"dtype": "float32"}, r"codecs\.int8\.dtype: unknown field"),
    ],
)
def test_bad_params_name_the_field(name, params, message) -> None:
    with pytest.raises(ValueError, match=message):
        codec_from_config(name, ENC, **params)


def test_unknown_codec_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown codec 'zstd'; expected one of \['collective', 'full'"):
        codec_config("zstd")


def test_encoder_must_be_a_config() -> None:
    with pytest.raises(ValueError, match="encoder must be an EncoderConfig"):
        codec_from_config("full", {"dim": 16})
