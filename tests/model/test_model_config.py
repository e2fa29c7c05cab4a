import pytest

from liverec.model import EncoderConfig, ModelConfig


def test_defaults_are_valid() -> None:
    cfg = ModelConfig()
    assert (cfg.encoder.dim, cfg.encoder.layers, cfg.encoder.heads, cfg.encoder.max_len) == (64, 2, 2, 50)
    assert cfg.encoder.head_dim == 32


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dim": 0}, "encoder.dim"),
        ({"layers": 0}, "encoder.layers"),
        ({"dim": 64, "heads": 3}, "encoder.heads"),
        ({"dim": 6, "heads": 2}, "encoder.heads"),  # odd head dim: RoPE rotates pairs
        ({"max_len": 0}, "encoder.max_len"),
        ({"dropout": 1.0}, "encoder.dropout"),
        ({"num_actions": 0}, "encoder.num_actions"),
    ],
)
def test_encoder_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        EncoderConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": 0.0}, "model.temperature"),
        ({"rank_negatives": 0}, "model.rank_negatives"),
        ({"rank_weight": -1.0}, "model.rank_weight"),
        ({"encoder": {"dim": 8}}, "model.encoder"),
    ],
)
def test_model_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        ModelConfig(**kwargs)
