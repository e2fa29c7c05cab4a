"""Codec configs (validated dataclasses) and `codec_from_config(name, encoder=..., **params)`.

Errors name the field (`codecs.window.window: must be > 0, got 0`), as the model configs do, so
a bad YAML value fails at start-up pointing at the line to fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from liverec.model.codecs.base import DTYPES, StateCodec, dtype_named
from liverec.model.codecs.collective import CollectiveCodec
from liverec.model.codecs.dense import FullCodec, Int8Codec, WindowCodec
from liverec.model.codecs.pages import PagesCodec
from liverec.model.codecs.summary import SummaryCodec
from liverec.model.config import EncoderConfig, ModelConfig


def _require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"codecs.{name}: {message}")


def _int(value: object, name: str, low: int, high: int | None = None) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer, got {value!r}")
    assert isinstance(value, int)
    _require(value >= low, name, f"must be >= {low}, got {value}")
    if high is not None:
        _require(value <= high, name, f"must be <= {high}, got {value}")


def _dtype(value: object, name: str) -> None:
    _require(value in DTYPES, name, f"must be one of {sorted(DTYPES)}, got {value!r}")


def _capacity(value: object, name: str) -> None:
    if value is not None:
        _int(value, name, 1)


@dataclass(frozen=True)
class FullConfig:
    """`capacity`: keep at most this many most recent positions (None: all). Set it to the
    trainer's cache capacity so that `append` keeps exactly what the trainer's cache keeps."""

    dtype: str = "float32"
    capacity: int | None = None

    def __post_init__(self) -> None:
        _dtype(self.dtype, "full.dtype")
        _capacity(self.capacity, "full.capacity")

    def build(self, encoder: EncoderConfig) -> StateCodec:
        return FullCodec(encoder, dtype_named("codecs.full.dtype", self.dtype), self.capacity)


@dataclass(frozen=True)
class Int8Config:
    capacity: int | None = None

    def __post_init__(self) -> None:
        _capacity(self.capacity, "int8.capacity")

    def build(self, encoder: EncoderConfig) -> StateCodec:
        return Int8Codec(encoder, self.capacity)


@dataclass(frozen=True)
class WindowConfig:
    window: int = 16
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _int(self.window, "window.window", 1)
        _dtype(self.dtype, "window.dtype")

    def build(self, encoder: EncoderConfig) -> StateCodec:
        return WindowCodec(encoder, self.window, dtype_named("codecs.window.dtype", self.dtype))


@dataclass(frozen=True)
class PagesConfig:
    page_size: int = 4
    pages: int = 4
    recent_pages: int = 1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _int(self.page_size, "pages.page_size", 1)
        _int(self.pages, "pages.pages", 1)
        _int(self.recent_pages, "pages.recent_pages", 0, self.pages)
        _dtype(self.dtype, "pages.dtype")

    def build(self, encoder: EncoderConfig) -> StateCodec:
        dtype = dtype_named("codecs.pages.dtype", self.dtype)
        return PagesCodec(encoder, self.page_size, self.pages, self.recent_pages, dtype)


@dataclass(frozen=True)
class SummaryConfig:
    tokens: int = 8
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _int(self.tokens, "summary.tokens", 1)
        _dtype(self.dtype, "summary.dtype")

    def build(self, encoder: EncoderConfig) -> StateCodec:
        return SummaryCodec(encoder, self.tokens, dtype_named("codecs.summary.dtype", self.dtype))


@dataclass(frozen=True)
class CollectiveConfig:
    """Per position: `groups` pool indices (1 byte each up to 256 entries, else 2) and `rank`
    int8 codes. `groups` must divide the K/V width per position, `layers * 2 * dim`;
    `groups = layers` gives each layer its own pool (layer 0's K/V depend on the event alone, so
    a large pool nearly holds them outright). Default: 2 x 2-byte indices + 4 codes = 8 bytes per
    position, 0.8% of the 1,024 bytes of fp32 K/V per position at 2 layers and dim 64."""

    pool_size: int = 4096
    rank: int = 4
    groups: int = 2

    def __post_init__(self) -> None:
        _int(self.pool_size, "collective.pool_size", 1, 65_536)
        _int(self.rank, "collective.rank", 1)
        _int(self.groups, "collective.groups", 1)

    def build(self, encoder: EncoderConfig) -> StateCodec:
        width = encoder.layers * 2 * encoder.dim
        _require(width % self.groups == 0, "collective.groups",
                 f"must divide layers * 2 * dim = {width}, got {self.groups}")
        return CollectiveCodec(encoder, self.pool_size, self.rank, self.groups)


CONFIGS: dict[str, type] = {
    "full": FullConfig,
    "int8": Int8Config,
    "window": WindowConfig,
    "pages": PagesConfig,
    "summary": SummaryConfig,
    "collective": CollectiveConfig,
}


def codec_config(name: str, **params: Any) -> Any:
    """The validated config of codec `name`; unknown names and fields are refused by name."""
    if name not in CONFIGS:
        raise ValueError(f"codecs: unknown codec {name!r}; expected one of {sorted(CONFIGS)}")
    cls = CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"codecs.{name}.{unknown[0]}: unknown field; {name} takes {sorted(fields) or 'no fields'}")
    return cls(**params)


def codec_from_config(name: str, encoder: EncoderConfig | ModelConfig | None = None, **params: Any) -> StateCodec:
    """Build codec `name` for a model with `encoder` (its shapes size the payloads and the
    learned parts); `params` are the fields of its config dataclass."""
    config = codec_config(name, **params)
    if isinstance(encoder, ModelConfig):
        encoder = encoder.encoder
    if encoder is None:
        encoder = EncoderConfig()
    if not isinstance(encoder, EncoderConfig):
        kind = type(encoder).__name__
        raise ValueError(f"codecs.{name}: encoder must be an EncoderConfig or ModelConfig, got {kind}")
    return config.build(encoder)
