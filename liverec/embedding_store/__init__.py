"""Collisionless hash embedding store (Monolith-style): admission, expiry, eviction, checkpoints.

Public API: EmbeddingStore and TableConfig (store.py, config.py), StoreEmbedding (module.py, the
torch module the trainer uses), HashIndex (hash_index.py), CountMinSketch (admission.py), and
the checkpoint functions save / restore / latest / verify with CheckpointError (checkpoint.py).
"""

from liverec.embedding_store.admission import CountMinSketch
from liverec.embedding_store.checkpoint import CheckpointError
from liverec.embedding_store.config import TableConfig
from liverec.embedding_store.hash_index import HashIndex
from liverec.embedding_store.module import StoreEmbedding
from liverec.embedding_store.store import EmbeddingStore
from liverec.embedding_store.table import TableDelta, TableStats

__all__ = [
    "CheckpointError",
    "CountMinSketch",
    "EmbeddingStore",
    "HashIndex",
    "StoreEmbedding",
    "TableConfig",
    "TableDelta",
    "TableStats",
]
