"""TableConfig validation: every bad field is refused at construction, naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from liverec.embedding_store import TableConfig

BAD_FIELDS: list[tuple[str, Any]] = [
    ("name", ""), ("dim", 0), ("dim", 2.5), ("dim", True), ("dtype", "float64"), ("initial_capacity", 0),
    ("min_count", 0), ("sketch_epsilon", 0.0), ("sketch_delta", 1.0), ("ttl_s", -1), ("ttl_s", 1.5),
    ("max_rows", 0), ("eviction", "fifo"), ("optimizer", "rmsprop"), ("lr", 0.0), ("lr", float("nan")),
    ("eps", -1.0), ("beta1", 1.0), ("beta2", -0.1), ("adagrad_init", -1.0), ("initializer", "xavier"),
    ("init_scale", 0.0), ("max_load", 0.9), ("max_load", 0.0),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_bad_field_is_refused_by_name(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"TableConfig\.{field} "):
        TableConfig(**{"name": "t", "dim": 4, field: value})


def test_round_trips_through_a_dict() -> None:
    config = TableConfig("item", 16, ttl_s=3600, max_rows=10, eviction="lfu", optimizer="adam", dtype="bfloat16")
    assert TableConfig.from_dict(config.to_dict()) == config


def test_from_dict_refuses_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown TableConfig fields"):
        TableConfig.from_dict({"name": "t", "dim": 4, "ttl": 5})
