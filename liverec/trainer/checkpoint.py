"""Trainer checkpoints: everything needed to resume exactly where the last one left off.

A checkpoint is a directory `checkpoints/NNNNNNNN/` holding
- `trainer.pt`: dense weights, Adam state, model version, RNG states, the next offset of every
  partition, the event counters, and a learned state codec's parameters (live and published)
  with their Adam state (`CodecTrainer.state_dict`);
- `history/`: a RocksDB checkpoint of the per-user history store;
- a reference to the embedding store's own checkpoint (full or incremental, under `store/`);
- `MANIFEST.json`, written last: sizes and sha256 of every file, and the store checkpoint name.

It is written under `.tmp-NNNNNNNN-<pid>`, fsynced, then renamed into place, so a crash at any
moment leaves either the complete new checkpoint or none (and a `.tmp-` directory, which the
next trainer to start removes). On start, checkpoints are tried newest first; one that fails
verification (a missing or corrupt file, a broken store chain) is skipped with a warning and the
previous complete one is used. Offsets live in the checkpoint, so the consumer resumes at exactly
the first event the restored state has not learned from: nothing lost, nothing applied twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from liverec.embedding_store import checkpoint as store_checkpoint
from liverec.embedding_store.store import EmbeddingStore

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer.pt"
HISTORY = "history"
FORMAT = 1
_NAME = re.compile(r"^\d{8}$")
FULL_STORE_EVERY = 5  # every 5th store checkpoint is full, so incremental chains stay short


class TrainerCheckpointError(Exception):
    """A trainer checkpoint that cannot be trusted (missing, partial or corrupt)."""


@dataclass(frozen=True)
class Restored:
    path: Path
    state: dict[str, Any]
    store: EmbeddingStore


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _files(root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        out[str(path.relative_to(root))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return out


class CheckpointManager:
    def __init__(self, state_dir: str | Path, kept: int) -> None:
        self.root = Path(state_dir) / "checkpoints"
        self.store_root = Path(state_dir) / "store"
        self.kept = kept
        self.root.mkdir(parents=True, exist_ok=True)
        self.store_root.mkdir(parents=True, exist_ok=True)
        self._saved = 0

    def names(self) -> list[str]:
        return sorted(n for n in os.listdir(self.root) if _NAME.match(n))

    def remove_leftovers(self) -> list[Path]:
        """Delete the `.tmp-` directories of checkpoint writes a crash cut off, trainer's and
        store's alike, and return them. They are never read, but nothing else would ever remove
        them, and one can be as large as a full store checkpoint. Only while holding the state
        directory (`StateDirLock`, liverec.platform.state_dir): no other process is writing one."""
        removed = []
        for root in (self.root, self.store_root):
            for entry in sorted(root.iterdir()):
                if entry.name.startswith(".tmp-"):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
        return removed

    def save(self, state: dict[str, Any], store: EmbeddingStore, history_checkpoint: Any) -> Path:
        """Write a complete checkpoint; `history_checkpoint(dest)` copies the history store to dest."""
        seq = int(self.names()[-1]) + 1 if self.names() else 1
        name = f"{seq:08d}"
        incremental = store.last_checkpoint is not None and self._saved % FULL_STORE_EVERY != 0
        store_path = store_checkpoint.save(store, self.store_root, incremental=incremental)
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            (tmp / TRAINER_STATE).write_bytes(buffer.getvalue())
            history_checkpoint(tmp / HISTORY)
            manifest = {"format": FORMAT, "seq": seq, "created_unix": time.time(),
                        "store_checkpoint": store_path.name, "files": _files(tmp)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _fsync_tree(tmp)
            os.rename(tmp, self.root / name)
        except BaseException:
            # A write that fails (a full disk) takes its partial files with it; the store checkpoint
            # just written stays: the store chains its next one onto it, and pruning drops it once
            # no checkpoint needs it.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._saved += 1
        self._prune()
        return self.root / name

    def verify(self, path: Path) -> dict[str, Any]:
        """The manifest of `path` if every file (and the store chain) checks out, else raise."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise TrainerCheckpointError(f"{path}: unreadable manifest: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise TrainerCheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT}")
        for rel, meta in manifest["files"].items():
            file = path / rel
            if not file.is_file() or file.stat().st_size != meta["bytes"] or _sha256(file) != meta["sha256"]:
                raise TrainerCheckpointError(f"{path}: {rel} is missing or does not match its checksum")
        try:
            store_checkpoint.verify(self.store_root / manifest["store_checkpoint"])
        except store_checkpoint.CheckpointError as exc:
            raise TrainerCheckpointError(f"{path}: store checkpoint: {exc}") from None
        return manifest

    def restore_latest(self, device: torch.device | str = "cpu") -> Restored | None:
        """The newest checkpoint that verifies, loaded; None when there is none at all."""
        for name in reversed(self.names()):
            path = self.root / name
            try:
                manifest = self.verify(path)
                state = torch.load(path / TRAINER_STATE, map_location=device, weights_only=False)
                store = store_checkpoint.restore(self.store_root / manifest["store_checkpoint"], device=device)
            except (TrainerCheckpointError, store_checkpoint.CheckpointError, OSError, RuntimeError) as exc:
                log.warning("skipping unusable checkpoint", extra={"checkpoint": str(path), "error": str(exc)})
                continue
            return Restored(path, state, store)
        return None

    def _prune(self) -> None:
        """Keep the newest `kept` checkpoints and every store checkpoint their chains need."""
        names = self.names()
        for old in names[: -self.kept]:
            shutil.rmtree(self.root / old, ignore_errors=True)
        needed: set[str] = set()
        for name in self.names():
            try:
                manifest = json.loads((self.root / name / MANIFEST).read_text())
                chain = store_checkpoint.verify(self.store_root / manifest["store_checkpoint"])
            except (OSError, ValueError, KeyError, store_checkpoint.CheckpointError):
                continue
            needed.update(link.path.name for link in chain)
        for entry in os.listdir(self.store_root):
            if entry not in needed and not entry.startswith(".tmp-"):
                shutil.rmtree(self.store_root / entry, ignore_errors=True)
