"""Materialise `liverec.params` into complete parameter versions (rows + dense weights).

Records are applied in topic order into a staging area; when a commit arrives whose dense
chunks are all present and whose checksum matches, the staged state becomes the new committed
version in one reference swap. Readers only ever see committed versions, so no request sees
half a version. A learned state codec's parameters ride in the dense blob (keys under
`PARAMS_PREFIX`) and come out as `ParamsVersion.codec_state`, swapped in with the same version.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from liverec.model.codecs.base import PARAMS_PREFIX
from liverec.model.config import EncoderConfig, ModelConfig
from liverec.v1 import params_pb2


class ParamsError(ValueError):
    """A parameter record that cannot be applied (malformed, or a commit that does not verify)."""


@dataclass(frozen=True)
class ParamsVersion:
    """One complete, immutable parameter version."""

    version: int
    event_time_ms: int
    model_config: ModelConfig
    dense_state: dict[str, torch.Tensor]
    rows: dict[str, dict[int, tuple[np.ndarray, int]]]  # table -> key -> (weights, count)
    codec_state: dict[str, torch.Tensor] = field(default_factory=dict)  # a learned codec's, or empty

    def table(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [N] sorted, weights [N, D], counts [N]) of one table."""
        entries = self.rows.get(name, {})
        keys = np.fromiter(sorted(entries), np.int64, len(entries))
        if not len(keys):
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
        weights = np.stack([entries[k][0] for k in keys.tolist()])
        counts = np.fromiter((entries[k][1] for k in keys.tolist()), np.int64, len(keys))
        return torch.from_numpy(keys), torch.from_numpy(weights), torch.from_numpy(counts)


def model_config_from_json(text: str) -> ModelConfig:
    data = json.loads(text)
    return ModelConfig(**{**data, "encoder": EncoderConfig(**data["encoder"])})


@dataclass
class _Staging:
    rows: dict[str, dict[int, tuple[np.ndarray, int]]] = field(default_factory=dict)
    dense: dict[int, params_pb2.DenseChunk] = field(default_factory=dict)


class ParamsMaterializer:
    def __init__(self) -> None:
        self._staging = _Staging()
        self._committed: ParamsVersion | None = None
        self.dense_blob = b""  # the serialized dense weights of the committed version
        self._lock = threading.Lock()

    @property
    def committed(self) -> ParamsVersion | None:
        return self._committed

    def apply(self, key: bytes, value: bytes | None) -> ParamsVersion | None:
        """Apply one record; returns the new version when it was a commit that completed one."""
        name = key.decode()
        if name.startswith("item/"):
            _, table, item = name.split("/", 2)
            rows = self._staging.rows.setdefault(table, {})
            if value is None:
                rows.pop(int(item), None)
            else:
                row = params_pb2.ItemRow.FromString(value)
                rows[row.key] = (np.frombuffer(row.weights, dtype="<f4").astype(np.float32), row.count)
            return None
        if name.startswith("dense/"):
            chunk = params_pb2.DenseChunk.FromString(value or b"")
            self._staging.dense[chunk.part] = chunk
            return None
        if name == "commit":
            return self._commit(params_pb2.ParamsCommit.FromString(value or b""))
        raise ParamsError(f"unknown parameter record key {name!r}")

    def _commit(self, commit: params_pb2.ParamsCommit) -> ParamsVersion:
        chunks = [self._staging.dense.get(p) for p in range(commit.dense_parts)]
        if any(c is None or c.version != commit.dense_version for c in chunks):
            raise ParamsError(f"commit {commit.version}: dense chunks of version {commit.dense_version} incomplete")
        blob = b"".join(c.data for c in chunks)  # type: ignore[union-attr]
        if hashlib.sha256(blob).digest() != commit.dense_sha256:
            raise ParamsError(f"commit {commit.version}: dense weights do not match their checksum")
        state: dict[str, Any] = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        codec_state = {k[len(PARAMS_PREFIX):]: v for k, v in state.items() if k.startswith(PARAMS_PREFIX)}
        version = ParamsVersion(
            version=commit.version, event_time_ms=commit.event_time_ms,
            model_config=model_config_from_json(commit.model_config_json),
            dense_state={k: v for k, v in state.items() if not k.startswith(PARAMS_PREFIX)},
            rows={table: dict(rows) for table, rows in self._staging.rows.items()}, codec_state=codec_state,
        )
        with self._lock:
            self._committed = version
            self.dense_blob = blob
        return version
