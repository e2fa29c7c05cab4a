"""Sequence encoder, scoring heads and state codecs, shared by trainer and serving.

Plain torch only: no embedding store, trainer or serving imports, so a GPU serving box without
torchrec can load it. Item embeddings come in as tensors; the caller owns the table.
"""

from liverec.model.config import EncoderConfig, ModelConfig
from liverec.model.encoder import EncoderOutput, KVCache, SequenceEncoder
from liverec.model.heads import RetrievalHead, TargetAttentionHead
from liverec.model.losses import bce_ranking_loss, sampled_softmax_loss
from liverec.model.recommender import ItemSide, Losses, SequentialRecommender, TrainBatch

__all__ = [
    "EncoderConfig",
    "EncoderOutput",
    "ItemSide",
    "KVCache",
    "Losses",
    "ModelConfig",
    "RetrievalHead",
    "SequenceEncoder",
    "SequentialRecommender",
    "TargetAttentionHead",
    "TrainBatch",
    "bce_ranking_loss",
    "sampled_softmax_loss",
]
