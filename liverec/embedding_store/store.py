"""The embedding store: several collisionless tables on one device, behind one interface.

What the trainer calls each step (through `StoreEmbedding`, or directly):

    rows = store.lookup("item", keys, train=True, now_s=event_time)   # admit/insert/touch
    emb = store.gather("item", rows)                                   # zeros for unadmitted keys
    ... forward, backward ...
    store.apply_gradients("item", rows, emb_grad)                      # sparse optimizer step
    store.expire(now_s)                                                # periodically

and around it: `frequency` (counts for logQ correction), `table_items` (the catalog for
full scoring), `mark`/`export_delta` (parameter deltas to serving), `stats` (metrics), and
`liverec.embedding_store.checkpoint` (full and incremental checkpoints).

`version` counts mutating calls; it is saved in checkpoints and stamped on deltas, so serving
can tell which training state a delta brings it to. `last_checkpoint` is the directory of the
checkpoint this store last wrote or was restored from: the parent of its next incremental.

Not thread-safe: one thread (the trainer's) calls into a store; other consumers get snapshots
(`table_items`, `export_delta`, checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from liverec.embedding_store.config import TableConfig
from liverec.embedding_store.table import Table, TableDelta, TableStats


class EmbeddingStore:
    """Collisionless embedding tables with admission, expiry, eviction and sparse optimizers."""

    def __init__(self, tables: Sequence[TableConfig], *, seed: int = 0, device: torch.device | str = "cpu") -> None:
        if not tables:
            raise ValueError("an EmbeddingStore needs at least one TableConfig")
        names = [config.name for config in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"table names must be unique, got {names}")
        self.seed = seed
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.version = 0
        self.last_checkpoint: Path | None = None
        self.tables: dict[str, Table] = {
            config.name: Table(config, seed=seed, device=self.device) for config in tables
        }

    @property
    def configs(self) -> list[TableConfig]:
        return [table.config for table in self.tables.values()]

    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"no table {name!r}; tables are {sorted(self.tables)}") from None

    # ------------------------------------------------------------------ training path

    def lookup(self, table: str, keys: torch.Tensor, *, train: bool = False, now_s: int | None = None) -> torch.Tensor:
        """Row of each key in `table`, -1 where it has none.

        train=False (serving, evaluation) only reads. train=True counts, admits, evicts, inserts
        and touches at event time `now_s` (seconds), and pins the rows until `apply_gradients`.
        """
        rows = self.table(table).lookup(keys, train=train, now_s=now_s)
        if train:
            self.version += 1
        return rows

    def gather(self, table: str, rows: torch.Tensor) -> torch.Tensor:
        """Embeddings of `rows` (from `lookup`); zeros for -1."""
        return self.table(table).gather(rows)

    def embed(self, table: str, keys: torch.Tensor) -> torch.Tensor:
        """Read-only embeddings of `keys`; zeros for keys without a row."""
        return self.gather(table, self.lookup(table, keys))

    def apply_gradients(self, table: str, rows: torch.Tensor, grads: torch.Tensor) -> int:
        """One optimizer step for the rows of this step's train lookups of `table` (concatenated,
        duplicates allowed) with their gradients; unpins the table. Returns rejected rows
        (non-finite summed gradient: left untouched, counted in stats)."""
        rejected = self.table(table).apply_gradients(rows, grads)
        self.version += 1
        return rejected

    def unpin(self) -> None:
        """Release every pinned row (a step abandoned before its gradients were applied)."""
        for table in self.tables.values():
            table.unpin()

    def expire(self, now_s: int) -> dict[str, int]:
        """Remove rows not updated for longer than their table's TTL; rows removed per table."""
        removed = {name: table.expire(now_s) for name, table in self.tables.items()}
        self.version += 1
        return removed

    # ------------------------------------------------------------------ readers

    def frequency(self, table: str, keys: torch.Tensor) -> torch.Tensor:
        """How often each key was looked up in training (int64): for logQ correction."""
        return self.table(table).frequency(keys)

    def table_items(self, table: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, weights) of every row of `table`: the catalog for full scoring."""
        return self.table(table).items()

    def stats(self) -> dict[str, TableStats]:
        return {name: table.stats() for name, table in self.tables.items()}

    def bytes_used(self) -> int:
        return sum(stats.bytes_used for stats in self.stats().values())

    # ------------------------------------------------------------------ deltas to serving

    def mark(self) -> None:
        """Start (or restart) tracking changes for `export_delta`."""
        for table in self.tables.values():
            table.start_log("delta")

    def export_delta(self, *, mark: bool = True) -> dict[str, TableDelta]:
        """Per table: keys and weights of rows changed since the mark, keys removed since it, and
        the store version. With mark=True (the default) the mark moves to now."""
        deltas = {name: table.delta(self.version) for name, table in self.tables.items()}
        if mark:
            self.mark()
        return deltas
