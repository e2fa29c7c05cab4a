"""Per-table configuration of the embedding store, validated when it is built.

A table is one feature's embedding space (item ids, user ids, action types...). Every field is
plain data (str, int, float, None), so a config round-trips through a checkpoint manifest and a
YAML file unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

OPTIMIZERS = ("sgd", "adagrad", "adam")
EVICTIONS = ("lru", "lfu")
INITIALIZERS = ("normal", "uniform", "zeros")
# Linear probing degrades sharply at high load (expected probes for a miss ~ (1 + 1/(1-load)^2) / 2:
# 8.5 at 0.75, 22 at 0.85); with a full-avalanche hash 0.85 is still short probes in a sector or two.
MAX_LOAD_LIMIT = 0.85
# The admission sketch's counters are uint8 and saturate here (admission.py), so min_count fits.
MAX_MIN_COUNT = 255
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TableConfig:
    """One table.

    name: table name (a feature maps to it); dim: embedding width; dtype: weight dtype
    ("float32", "float16", "bfloat16"; optimizer state is always float32).
    initial_capacity: rows to allocate up front (the table grows past it).
    min_count: lookups (in train mode) before a key is admitted (at most 255); 1 admits on first
    sight and needs no sketch. sketch_epsilon / sketch_delta: the count-min error bound (see admission.py).
    ttl_s: event-time seconds without an update after which `expire` removes a row; None = never.
    max_rows: row budget enforced by `eviction` ("lru": oldest last update first, "lfu": lowest
    count first; ties by smaller key); None = unbounded.
    optimizer: "sgd", "adagrad" or "adam", with lr, eps, beta1, beta2 (adam), and
    adagrad_init (initial accumulator).
    initializer: "normal" (std = init_scale), "uniform" (in [-init_scale, init_scale]) or "zeros".
    max_load: hash-index load (tombstones included) that triggers a rehash; at most 0.85.
    """

    name: str
    dim: int
    dtype: str = "float32"
    initial_capacity: int = 1024
    min_count: int = 1
    sketch_epsilon: float = 1e-5
    sketch_delta: float = 0.01
    ttl_s: int | None = None
    max_rows: int | None = None
    eviction: str = "lru"
    optimizer: str = "adagrad"
    lr: float = 0.01
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    adagrad_init: float = 0.0
    initializer: str = "normal"
    init_scale: float = 0.01
    max_load: float = 0.75

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and self.name != "", "name", self.name, "a non-empty string")
        _require(_is_int(self.dim) and self.dim >= 1, "dim", self.dim, "an int >= 1")
        _require(self.dtype in DTYPES, "dtype", self.dtype, f"one of {sorted(DTYPES)}")
        _require(_is_int(self.initial_capacity) and self.initial_capacity >= 1, "initial_capacity",
                 self.initial_capacity, "an int >= 1")
        _require(_is_int(self.min_count) and 1 <= self.min_count <= MAX_MIN_COUNT, "min_count", self.min_count,
                 f"an int in [1, {MAX_MIN_COUNT}]")
        _require(_is_fraction(self.sketch_epsilon), "sketch_epsilon", self.sketch_epsilon, "in (0, 1)")
        _require(_is_fraction(self.sketch_delta), "sketch_delta", self.sketch_delta, "in (0, 1)")
        _require(self.ttl_s is None or (_is_int(self.ttl_s) and self.ttl_s >= 0), "ttl_s", self.ttl_s,
                 "None or an int >= 0")
        _require(self.max_rows is None or (_is_int(self.max_rows) and self.max_rows >= 1), "max_rows",
                 self.max_rows, "None or an int >= 1")
        _require(self.eviction in EVICTIONS, "eviction", self.eviction, f"one of {EVICTIONS}")
        _require(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        for name in ("lr", "eps", "init_scale"):
            value = getattr(self, name)
            _require(_is_real(value) and value > 0, name, value, "a finite float > 0")
        _require(_is_real(self.adagrad_init) and self.adagrad_init >= 0, "adagrad_init", self.adagrad_init,
                 "a finite float >= 0")
        _require(_is_real(self.beta1) and 0 <= self.beta1 < 1, "beta1", self.beta1, "in [0, 1)")
        _require(_is_real(self.beta2) and 0 <= self.beta2 < 1, "beta2", self.beta2, "in [0, 1)")
        _require(self.initializer in INITIALIZERS, "initializer", self.initializer, f"one of {INITIALIZERS}")
        _require(_is_real(self.max_load) and 0 < self.max_load <= MAX_LOAD_LIMIT, "max_load", self.max_load,
                 f"in (0, {MAX_LOAD_LIMIT}]")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableConfig:
        unknown = set(data) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TableConfig fields: {sorted(unknown)}")
        return cls(**data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_fraction(value: object) -> bool:
    return _is_real(value) and 0 < value < 1


def _require(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"TableConfig.{field} must be {expected}, got {value!r}")
