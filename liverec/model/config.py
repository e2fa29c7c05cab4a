"""Model configuration: plain dataclasses, validated on construction.

Errors name the offending field (`encoder.heads: ...`) so that a bad value in a YAML file fails
at start-up with a message that points at the line to fix. The model package keeps its own
configs (no dependency on `liverec.platform`) so serving can load it with plain torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {message}")


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of the causal sequence encoder.

    `max_len` is the history window the model is trained on; it is also the default capacity of
    a user's K/V cache, because attention is only trained on offsets below it.
    `num_actions` must cover every action id in the event stream (the proto `Action` enum: 0..5).
    `dropout` (0.1) is the online learner's: with experience replay (trainer.replay_users) it
    trains each stored window many times, and without dropout it overfits them (on ml-100k,
    more replay then lowered NDCG@10); offline training sets its own.
    """

    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.1
    ffn_mult: int = 4
    num_actions: int = 6
    rope_base: float = 10_000.0

    def __post_init__(self) -> None:
        _require(self.dim > 0, "encoder.dim", f"must be > 0, got {self.dim}")
        _require(self.layers > 0, "encoder.layers", f"must be > 0, got {self.layers}")
        _require(self.heads > 0, "encoder.heads", f"must be > 0, got {self.heads}")
        _require(
            self.dim % self.heads == 0 and (self.dim // self.heads) % 2 == 0,
            "encoder.heads",
            f"dim/heads must be an even integer (RoPE rotates pairs), got dim={self.dim}, heads={self.heads}",
        )
        _require(self.max_len > 0, "encoder.max_len", f"must be > 0, got {self.max_len}")
        _require(0.0 <= self.dropout < 1.0, "encoder.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(self.ffn_mult > 0, "encoder.ffn_mult", f"must be > 0, got {self.ffn_mult}")
        _require(self.num_actions > 0, "encoder.num_actions", f"must be > 0, got {self.num_actions}")
        _require(self.rope_base > 1.0, "encoder.rope_base", f"must be > 1, got {self.rope_base}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class ModelConfig:
    """The encoder plus the scoring heads and the training losses.

    `temperature` divides the cosine similarities of the retrieval head (both sides are
    L2-normalised, which keeps the logits bounded whatever scale the embedding store uses);
    0.1 beat 0.05 for the online model on ml-100k with the exact softmax.
    `rank_negatives` uniform negatives per target train the target-attention head;
    `rank_weight` scales its loss against the retrieval loss.
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    temperature: float = 0.1
    in_batch_negatives: bool = True
    rank_negatives: int = 8
    rank_weight: float = 1.0
    rank_mlp_hidden: int = 128

    def __post_init__(self) -> None:
        _require(isinstance(self.encoder, EncoderConfig), "model.encoder", "must be an EncoderConfig")
        _require(self.temperature > 0.0, "model.temperature", f"must be > 0, got {self.temperature}")
        _require(self.rank_negatives > 0, "model.rank_negatives", f"must be > 0, got {self.rank_negatives}")
        _require(self.rank_weight >= 0.0, "model.rank_weight", f"must be >= 0, got {self.rank_weight}")
        _require(self.rank_mlp_hidden > 0, "model.rank_mlp_hidden", f"must be > 0, got {self.rank_mlp_hidden}")
