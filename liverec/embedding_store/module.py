"""`StoreEmbedding`: the embedding store as a torch module with sparse gradients.

forward() looks features up and returns, per feature, one embedding per value. In train mode
each returned tensor is a fresh autograd leaf (the gathered rows), so backward() through any
model leaves a gradient per occurrence on it without ever materialising a gradient for the whole
table. apply_gradients() then hands each table the rows and gradients of all of this step's
lookups of that table at once, so a key looked up by two features (item history and target
item, say) gets one optimizer step on the sum of its gradients.

Input is a torchrec KeyedJaggedTensor (duck-typed: anything with keys(), values() and
length_per_key(), so the module also runs where torchrec is not installed, as on the GPU
image) or a mapping feature -> 1-D int64 key tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from liverec.embedding_store.store import EmbeddingStore


@dataclass
class _PendingLookup:
    table: str
    rows: torch.Tensor
    embeddings: torch.Tensor


class StoreEmbedding(nn.Module):
    """Looks features up in an EmbeddingStore; trains the touched rows with the tables' optimizers.

    feature_tables maps feature name -> table name; a feature not in it uses the table of its
    own name.
    """

    def __init__(self, store: EmbeddingStore, feature_tables: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.store = store
        self.feature_tables = dict(feature_tables or {})
        for feature, table in self.feature_tables.items():
            store.table(table)
        self._pending: list[_PendingLookup] = []

    def table_of(self, feature: str) -> str:
        return self.feature_tables.get(feature, feature)

    def forward(self, features: Any, now_s: int | None = None) -> dict[str, torch.Tensor]:
        """Per feature, a (number of values, dim) tensor of embeddings; zeros for unadmitted keys.

        In train mode `now_s` (event time, seconds) is required and the outputs require grad.
        """
        return {feature: self._embed(feature, keys, now_s) for feature, keys in _split(features).items()}

    def _embed(self, feature: str, keys: torch.Tensor, now_s: int | None) -> torch.Tensor:
        table = self.table_of(feature)
        rows = self.store.lookup(table, keys, train=self.training, now_s=now_s)
        embeddings = self.store.gather(table, rows)
        if self.training:
            embeddings.requires_grad_(True)
            self._pending.append(_PendingLookup(table, rows, embeddings))
        return embeddings

    def apply_gradients(self) -> int:
        """Apply the sparse updates of every train lookup since the last call; returns the number
        of rows rejected for non-finite gradients. Lookups whose output got no gradient are
        released without an update."""
        by_table: dict[str, list[_PendingLookup]] = {}
        for lookup in self._pending:
            by_table.setdefault(lookup.table, []).append(lookup)
        self._pending = []
        rejected = 0
        for table, lookups in by_table.items():
            graded = [lookup for lookup in lookups if lookup.embeddings.grad is not None]
            if not graded:
                self.store.table(table).unpin()
                continue
            if len(graded) == 1:  # the lookup's own rows tensor: the table reuses its deduplication
                rows, grads = graded[0].rows, graded[0].embeddings.grad
            else:
                rows = torch.cat([lookup.rows for lookup in graded])
                grads = torch.cat([lookup.embeddings.grad for lookup in graded])
            rejected += self.store.apply_gradients(table, rows, grads)
        return rejected

    def discard(self) -> None:
        """Drop this step's pending lookups without updating (e.g. the loss was not finite)."""
        self._pending = []
        self.store.unpin()


def _split(features: Any) -> dict[str, torch.Tensor]:
    """Feature name -> its 1-D key tensor, from a KeyedJaggedTensor or a mapping."""
    if isinstance(features, Mapping):
        return dict(features)
    if all(hasattr(features, name) for name in ("keys", "values", "length_per_key")):
        values = features.values()
        return dict(zip(features.keys(), torch.split(values, features.length_per_key())))
    raise TypeError(f"features must be a KeyedJaggedTensor or a mapping of feature -> keys, got {type(features).__name__}")
