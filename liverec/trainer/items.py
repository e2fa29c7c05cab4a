"""The item table the learner trains: one table of the EmbeddingStore, seen through `ItemTable`.

Admission counts each *event* once (`observe`, a train lookup), while the windows that replay a
user's history read rows without counting them again (`embed`, a read lookup) and still receive
gradients: the store's frequencies are then true event counts, which logQ correction and the
popularity baseline rely on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from liverec.embedding_store.store import EmbeddingStore

ITEM_TABLE = "item"


class StoreItemTable:
    def __init__(self, store: EmbeddingStore, table: str = ITEM_TABLE) -> None:
        self.store = store
        self.table = table
        self._pending: list[tuple[Tensor, Tensor]] = []

    def observe(self, keys: Tensor, now_s: int) -> None:
        self.store.lookup(self.table, keys, train=True, now_s=now_s)
        self.store.unpin()

    def embed(self, keys: Tensor) -> Tensor:
        rows = self.store.lookup(self.table, keys)
        emb = self.store.gather(self.table, rows)
        if torch.is_grad_enabled():
            emb.requires_grad_(True)
            self._pending.append((rows, emb))
        return emb

    def step(self, now_s: int) -> None:
        graded = [(rows, emb.grad) for rows, emb in self._pending if emb.grad is not None]
        self._pending = []
        if graded:
            self.store.apply_gradients(self.table, torch.cat([r for r, _ in graded]), torch.cat([g for _, g in graded]))

    def discard(self) -> None:
        """Forget this step's lookups (the step was abandoned, e.g. a non-finite loss)."""
        self._pending = []

    def catalog(self) -> tuple[Tensor, Tensor, Tensor]:
        keys, weights = self.store.table_items(self.table)
        return keys, weights, self.store.frequency(self.table, keys)
