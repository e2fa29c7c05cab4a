"""Dirty tracking: which rows changed, and which keys were removed, since a cursor was reset.

Two independent cursors use this: incremental checkpoints (changes since the last checkpoint)
and parameter deltas to serving (changes since the last `mark`). A per-row flag costs one byte
per row and makes "the changed rows" one vectorised scan; removed keys are logged as batches.

A row's flag says "this row's contents changed", not "this key changed": when a row is freed and
handed to another key, the new key's insertion flags it again. So the delta is the flagged rows
that still hold a key, plus the logged keys that hold no row any more (a key removed and then
re-admitted is a changed row, not a removal).
"""

from __future__ import annotations

import torch

from liverec.embedding_store.storage import grown

_COMPACT_EVERY = 64


class ChangeLog:
    """Changed-row flags and a removed-key log for one cursor."""

    def __init__(self, row_capacity: int, device: torch.device) -> None:
        self.changed = torch.zeros(row_capacity, dtype=torch.bool, device=device)
        self._removed: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        return self.changed.numel() + sum(keys.numel() * 8 for keys in self._removed)

    def rows_changed(self, rows: torch.Tensor) -> None:
        self.changed.index_fill_(0, rows, True)

    def keys_removed(self, keys: torch.Tensor) -> None:
        """Log removed keys; the log is compacted (deduplicated) as it grows."""
        self._removed.append(keys)
        if len(self._removed) >= _COMPACT_EVERY:
            self._removed = [torch.unique(torch.cat(self._removed))]

    def grow(self, row_capacity: int) -> None:
        old = self.changed.numel()
        self.changed = grown(self.changed, row_capacity)
        self.changed[old:] = False

    def removed_keys(self) -> torch.Tensor:
        """Every logged key, once each, sorted (the caller drops those that hold a row again)."""
        if not self._removed:
            return torch.empty(0, dtype=torch.int64, device=self.changed.device)
        return torch.unique(torch.cat(self._removed))
