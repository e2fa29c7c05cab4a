"""Full and incremental checkpoints of an EmbeddingStore: atomic, checksummed, verified on restore.

Layout: a checkpoint root holds one directory per checkpoint, `NNNNNNNN-full` or
`NNNNNNNN-incremental` (NNNNNNNN: a sequence number). Each holds `data.bin`, every tensor raw at
a 64-byte aligned offset, and `manifest.json`: the table configs, the scalars (high-water mark,
slot count, counters, version), each tensor's offset, dtype and shape, the size and sha256 of
`data.bin`, a parent name for an incremental, and the sha256 of the manifest body itself. One
data file, not one per tensor, because every file costs an fsync.

- Full: every live row (key, row, weights, optimizer state, last update, count) and the sketch.
- Incremental: only rows changed since the previous checkpoint of this store, the keys removed
  since, and the sketch — so its cost follows the dirty rows, not the table size.

Atomic: everything is written under `.tmp-<name>-<uuid>`, each file fsynced, the manifest last,
then the directory is renamed into place and the root fsynced. A crash leaves a `.tmp-` directory
that is never read, and the previous checkpoint untouched. Writing goes through a file-backed
tensor (`torch.from_file(shared=True)`, a shared mapping of data.bin) in bounded chunks, so a
10M-row table is written without a second copy of its weights in memory.

Restore verifies the whole chain (full, then incrementals) before reading anything; any missing
file, size or checksum mismatch, unparsable or tampered manifest raises CheckpointError, and
`latest` skips such checkpoints, so the previous one stays restorable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from liverec.embedding_store.config import DTYPES, TableConfig
from liverec.embedding_store.store import EmbeddingStore
from liverec.embedding_store.table import Table

# Format 3: the sketch's counters are packed 2, 4 or 8 bits a cell as min_count allows (format 2:
# one uint8 per cell); last_update is int32 seconds from table.TIME_BASE_S (format 1: int64
# seconds). Older formats are refused.
FORMAT = 3
MANIFEST = "manifest.json"
DATA = "data.bin"
_ALIGN = 64
_NAME = re.compile(r"^(\d{8})-(full|incremental)$")
_CHUNK_BYTES = 64 << 20
_DTYPES_BY_NAME = {**DTYPES, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES_BY_NAME.items()}


class CheckpointError(Exception):
    """A checkpoint that cannot be trusted: missing, partial, corrupt or inconsistent."""


@dataclass(frozen=True)
class Checkpoint:
    """One verified checkpoint directory and its manifest body (a link of a restore chain)."""

    path: Path
    manifest: dict[str, Any]


# --------------------------------------------------------------------------- saving


def save(store: EmbeddingStore, root: str | Path, *, incremental: bool = False) -> Path:
    """Write a checkpoint of `store` under `root`; returns its directory.

    incremental=True writes only what changed since the store's previous checkpoint, which must
    be in the same root (the store remembers it: `store.last_checkpoint`).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    parent = _incremental_parent(store, root) if incremental else None
    seq = max((int(m.group(1)) for m in map(_NAME.match, os.listdir(root)) if m), default=0) + 1
    name = f"{seq:08d}-{'incremental' if incremental else 'full'}"
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        pieces: list[_Piece] = []
        tables = [
            _table_entry(table, f"t{i}", pieces, incremental=incremental)
            for i, table in enumerate(store.tables.values())
        ]
        tensors, data = _write_data(tmp / DATA, pieces)
        body = {
            "format": FORMAT,
            "kind": "incremental" if incremental else "full",
            "seq": seq,
            "parent": parent,
            "store": {"seed": store.seed, "version": store.version},
            "tables": tables,
            "tensors": tensors,
            "data": data,
        }
        _write_manifest(tmp / MANIFEST, body)
        _fsync(tmp)
        os.rename(tmp, root / name)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for table in store.tables.values():
        table.start_log("checkpoint")
    store.last_checkpoint = root / name
    return root / name


def _incremental_parent(store: EmbeddingStore, root: Path) -> str:
    last = store.last_checkpoint
    if last is None or any("checkpoint" not in table.logs for table in store.tables.values()):
        raise ValueError("an incremental checkpoint needs a previous checkpoint of this store: save a full one first")
    if last.parent.resolve() != root.resolve():
        raise ValueError(f"the previous checkpoint {last} is not in {root}; incrementals chain within one root")
    return last.name


@dataclass(frozen=True)
class _Piece:
    """One tensor to write: `source`, or only its `rows` when given."""

    name: str
    source: torch.Tensor
    rows: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        count = self.source.shape[0] if self.rows is None else self.rows.numel()
        return (count, *self.source.shape[1:])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.source.element_size()


def _table_entry(table: Table, prefix: str, pieces: list[_Piece], *, incremental: bool) -> dict[str, Any]:
    """Queue the table's tensors in `pieces`; return its manifest entry."""
    if incremental:
        rows, removed = table.changes("checkpoint")
        pieces.append(_Piece(f"{prefix}.removed", removed))
    else:
        rows = table.live_rows()
    pieces.append(_Piece(f"{prefix}.rows", rows))
    pieces.append(_Piece(f"{prefix}.keys", table.keys_by_row, rows))
    pieces.extend(_Piece(f"{prefix}.{column}", tensor, rows) for column, tensor in table.columns().items())
    if table.sketch is not None:
        pieces.append(_Piece(f"{prefix}.sketch", table.sketch.counters))
    return {
        "config": table.config.to_dict(),
        "prefix": prefix,
        "high_water": table.index.high_water,
        "slots": table.index.capacity,
        "counters": dict(table.counters),
        "sketch_total": None if table.sketch is None else table.sketch.total,
    }


def _write_data(path: Path, pieces: list[_Piece]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write every piece raw into one file (64-byte aligned) through a shared file mapping, in
    chunks of bounded size; fsync it. Returns the tensor records and the file's size and sha256."""
    tensors: dict[str, Any] = {}
    offset = 0
    for piece in pieces:
        tensors[piece.name] = {"offset": offset, "dtype": _DTYPE_NAMES[piece.source.dtype], "shape": list(piece.shape)}
        offset += -(-piece.nbytes // _ALIGN) * _ALIGN
    if offset == 0:
        path.touch()
    else:
        mapped = torch.from_file(str(path), shared=True, size=offset, dtype=torch.uint8)
        for piece in pieces:
            start = tensors[piece.name]["offset"]
            target = mapped[start : start + piece.nbytes].view(piece.source.dtype).view(piece.shape)
            _copy_rows(piece, target)
        del mapped
    _fsync(path)
    return tensors, {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _copy_rows(piece: _Piece, target: torch.Tensor) -> None:
    count = target.shape[0]
    row_bytes = max(piece.nbytes // max(count, 1), 1)
    step = max(_CHUNK_BYTES // row_bytes, 1)
    for start in range(0, count, step):
        stop = min(start + step, count)
        if piece.rows is None:
            chunk = piece.source[start:stop]
        else:
            chunk = piece.source.index_select(0, piece.rows[start:stop])
        target[start:stop] = chunk.cpu()


def _write_manifest(path: Path, body: dict[str, Any]) -> None:
    text = json.dumps({"body": body, "sha256": _body_digest(body)}, indent=1, sort_keys=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _body_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- restoring


def restore(path: str | Path, *, device: torch.device | str = "cpu") -> EmbeddingStore:
    """Rebuild the store saved at checkpoint directory `path` (following its incremental chain)
    on `device`: same keys, rows, weights, optimizer state, metadata, sketch, counters, version.
    Raises CheckpointError, before building anything, if any part of the chain is unusable."""
    chain = verify(path)
    newest = chain[-1].manifest
    configs = [TableConfig.from_dict(entry["config"]) for entry in newest["tables"]]
    for link in chain:
        if [entry["config"] for entry in link.manifest["tables"]] != [c.to_dict() for c in configs]:
            raise CheckpointError(f"{link.path} has other table configs than {chain[-1].path}")
    store = EmbeddingStore(configs, seed=newest["store"]["seed"], device=device)
    for position, config in enumerate(configs):
        _restore_table(store.table(config.name), [(link, link.manifest["tables"][position]) for link in chain])
    store.version = newest["store"]["version"]
    store.last_checkpoint = chain[-1].path
    return store


def _restore_table(table: Table, chain: list[tuple[Checkpoint, dict[str, Any]]]) -> None:
    for link, entry in chain:
        prefix = entry["prefix"]
        if link.manifest["kind"] == "incremental":
            table.drop_keys(_read_tensor(link, f"{prefix}.removed").to(table.device))
        rows = _read_tensor(link, f"{prefix}.rows").to(table.device)
        keys = _read_tensor(link, f"{prefix}.keys").to(table.device)
        columns = {name: _read_tensor(link, f"{prefix}.{name}") for name in table.columns()}
        table.load_rows(keys, rows, columns)
    newest = chain[-1][1]
    table.rebuild_index(high_water=newest["high_water"], slots=newest["slots"])
    table.counters = dict(newest["counters"])
    if table.sketch is not None:
        table.sketch.load_state(_read_tensor(chain[-1][0], f"{newest['prefix']}.sketch").to(table.device),
                                newest["sketch_total"])
    table.start_log("checkpoint")


def _read_tensor(link: Checkpoint, name: str) -> torch.Tensor:
    """A tensor of a verified checkpoint, as a CPU view of a private mapping of its data file."""
    record = link.manifest["tensors"].get(name)
    if record is None:
        raise CheckpointError(f"{link.path} has no tensor {name!r} in its manifest")
    shape = tuple(record["shape"])
    dtype = _DTYPES_BY_NAME[record["dtype"]]
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if record["offset"] % _ALIGN or record["offset"] + nbytes > link.manifest["data"]["bytes"]:
        raise CheckpointError(f"{link.path}: tensor {name!r} lies outside {DATA}")
    mapped = torch.from_file(str(link.path / DATA), shared=False, size=link.manifest["data"]["bytes"], dtype=torch.uint8)
    return mapped[record["offset"] : record["offset"] + nbytes].view(dtype).view(shape)


def verify(path: str | Path) -> list[Checkpoint]:
    """The checkpoint chain ending at `path`, oldest (the full one) first, after checking every
    manifest and every file's size and sha256. Raises CheckpointError on the first problem."""
    chain = [_load_manifest(Path(path))]
    while chain[-1].manifest["kind"] == "incremental":
        parent = chain[-1].manifest["parent"]
        match = _NAME.match(parent) if isinstance(parent, str) else None
        if match is None or int(match.group(1)) >= chain[-1].manifest["seq"]:
            raise CheckpointError(f"{chain[-1].path} names an invalid parent {parent!r}")
        chain.append(_load_manifest(chain[-1].path.parent / parent))
    chain.reverse()
    for link in chain:
        data, record = link.path / DATA, link.manifest["data"]
        if not data.is_file():
            raise CheckpointError(f"{link.path} is missing {DATA}")
        if data.stat().st_size != record["bytes"]:
            raise CheckpointError(f"{data} has {data.stat().st_size} bytes, the manifest says {record['bytes']}")
        if _sha256(data) != record["sha256"]:
            raise CheckpointError(f"{data} does not match its sha256 in the manifest (corrupt)")
    return chain


def _load_manifest(path: Path) -> Checkpoint:
    match = _NAME.match(path.name)
    if match is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (NNNNNNNN-full or NNNNNNNN-incremental)")
    try:
        document = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        body = document["body"]
        intact = document["sha256"] == _body_digest(body)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: unreadable manifest ({error})") from error
    if not intact:
        raise CheckpointError(f"{path}: manifest does not match its own sha256 (corrupt)")
    if body.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {body.get('format')!r}, this code reads only format {FORMAT} "
                              "(format 2 stored a byte per sketch counter, format 1 int64 update times; no conversion)")
    if body.get("seq") != int(match.group(1)) or body.get("kind") != match.group(2):
        raise CheckpointError(f"{path}: manifest says {body.get('seq')}-{body.get('kind')}, the name disagrees")
    return Checkpoint(path, body)


def latest(root: str | Path) -> Path | None:
    """The newest checkpoint under `root` whose whole chain verifies; None if there is none."""
    root = Path(root)
    if not root.is_dir():
        return None
    names = sorted((name for name in os.listdir(root) if _NAME.match(name)), reverse=True)
    for name in names:
        try:
            verify(root / name)
        except CheckpointError:
            continue
        return root / name
    return None
