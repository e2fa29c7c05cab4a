"""Codecs that store the K/V of kept positions as they are: `full`, `window` and `int8`.

Payload (little-endian): `next_pos i64, n u32`, then for `full`/`window` a dtype byte and `n`
rows of `L * 2 * H * D/H` floats, oldest first; for `int8` `n` rows of `L * 2 * H` fp32 scales
followed by `L * 2 * H * D/H` int8 codes. Rows are position-major, so appending an event
concatenates a row and dropping the oldest slices one off: all three are incremental, and
`append` gives the same bytes as encoding the extended cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from liverec.model.codecs.base import (
    HEAD,
    Cost,
    PayloadError,
    StateCodec,
    check_length,
    dtype_code,
    dtype_of_code,
    dtype_size,
    from_rows,
    pad_flat_rows,
    read_head,
    tensor_bytes,
    tensor_from,
    to_rows,
)
from liverec.model.config import EncoderConfig
from liverec.model.encoder import KVCache

if TYPE_CHECKING:
    from liverec.model.recommender import SequentialRecommender


class _RowCodec(StateCodec):
    """Stores each user's last `window` valid rows (all of them when `window` is None)."""

    incremental = True
    _extra = 0  # bytes between HEAD and the rows

    def __init__(self, encoder: EncoderConfig, window: int | None) -> None:
        super().__init__(encoder)
        self.window = window

    # Subclasses: rows [n, L, 2, H, Dh] float -> bytes (n * row_bytes), and back.
    row_bytes: int

    def _rows_to_bytes(self, rows: Tensor) -> bytes:
        raise NotImplementedError

    def _rows_from_bytes(self, data: memoryview, n: int) -> Tensor:
        raise NotImplementedError

    def _prefix(self) -> bytes:
        return b""

    def _check_prefix(self, payload: memoryview) -> None:
        pass

    def encode(self, cache: KVCache, model: SequentialRecommender | None = None) -> list[bytes]:
        rows, valid = to_rows(cache), cache.valid
        out = []
        for b in range(rows.shape[0]):
            kept = rows[b][valid[b]]
            if self.window is not None:
                kept = kept[-self.window:] if self.window < kept.shape[0] else kept
            out.append(HEAD.pack(int(cache.next_pos[b]), kept.shape[0]) + self._prefix() + self._rows_to_bytes(kept))
        return out

    def _parse(self, payload: bytes) -> tuple[int, int, memoryview]:
        view = memoryview(payload)
        next_pos, n = read_head(view, self.codec_id)
        if len(view) >= HEAD.size + self._extra:
            self._check_prefix(view)
        check_length(view, HEAD.size + self._extra + n * self.row_bytes, self.codec_id)
        return next_pos, n, view[HEAD.size + self._extra:]

    def decode(self, payloads: Sequence[bytes], device: torch.device | str = "cpu") -> KVCache:
        # Every user's rows are decoded in one pass over the joined bodies: serving decodes a
        # whole request batch per call, and per-user tensor work would dominate it.
        bodies, counts, next_pos = [], [], []
        for payload in payloads:
            pos, n, body = self._parse(payload)
            bodies.append(body)
            counts.append(n)
            next_pos.append(pos)
        flat = self._rows_from_bytes(memoryview(b"".join(bodies)), sum(counts))
        padded, valid = pad_flat_rows(flat, counts, device)
        return from_rows(padded, valid, torch.tensor(next_pos, dtype=torch.long, device=device))

    def append(self, payloads: Sequence[bytes], new: KVCache) -> list[bytes]:
        rows, counts = to_rows(new), new.valid.sum(1)
        if len(payloads) != rows.shape[0]:
            raise ValueError(f"append: {len(payloads)} payloads for {rows.shape[0]} users")
        out = []
        for b, payload in enumerate(payloads):
            pos, n, body = self._parse(payload)
            added = int(counts[b])
            if pos + added != int(new.next_pos[b]):
                raise ValueError(
                    f"append: user {b} was at position {pos}, {added} new events must end at {pos + added}, "
                    f"but new.next_pos is {int(new.next_pos[b])}"
                )
            kept_old = n if self.window is None else max(0, min(n, self.window - added))
            fresh = rows[b][new.valid[b]]
            if self.window is not None and added > self.window:
                fresh = fresh[-self.window:]
            head = HEAD.pack(pos + added, kept_old + fresh.shape[0]) + self._prefix()
            out.append(head + bytes(body[(n - kept_old) * self.row_bytes:]) + self._rows_to_bytes(fresh))
        return out

    def bytes_per_user(self, history_len: int) -> int:
        n = history_len if self.window is None else min(history_len, self.window)
        return HEAD.size + self._extra + n * self.row_bytes


class FullCodec(_RowCodec):
    """Every position's K and V in fp32 (exact round trip) or bf16/fp16 (rounded once)."""

    codec_id = "full"
    _extra = 1

    def __init__(self, encoder: EncoderConfig, dtype: torch.dtype = torch.float32, window: int | None = None) -> None:
        super().__init__(encoder, window)
        self.dtype = dtype
        self.row_bytes = self.row_numel * dtype_size(dtype)

    def _prefix(self) -> bytes:
        return bytes([dtype_code(self.dtype)])

    def _check_prefix(self, payload: memoryview) -> None:
        stored = dtype_of_code(payload[HEAD.size], self.codec_id)
        if stored != self.dtype:
            raise PayloadError(f"{self.codec_id}: payload stores {stored}, this codec reads {self.dtype}")

    def _rows_to_bytes(self, rows: Tensor) -> bytes:
        return tensor_bytes(rows, self.dtype)

    def _rows_from_bytes(self, data: memoryview, n: int) -> Tensor:
        return tensor_from(data, self.dtype, (n, *self.row_shape))

    @property
    def cost(self) -> Cost:
        return Cost(
            refresh="append: one row (run the new event over the decoded cache, concatenate its K/V)",
            serve="copy every stored row to the device; attention over all positions",
        )


class WindowCodec(FullCodec):
    """The most recent `window` positions only (token pruning, StreamingLLM-like)."""

    codec_id = "window"

    def __init__(self, encoder: EncoderConfig, window: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(encoder, dtype, window)

    @property
    def cost(self) -> Cost:
        return Cost(
            refresh="append: one row, the oldest dropped beyond the window",
            serve=f"copy at most {self.window} rows; attention over them",
        )


class Int8Codec(_RowCodec):
    """KIVI-like precision reduction: int8 codes with one fp32 scale per row of D/H values.

    A row is one head's K (or V) vector at one position in one layer. With
    `scale = max|x| / 127` and `q = round(x / scale)`, every decoded value is within
    `scale / 2 = max|row| / 254` of the original (plus fp32 rounding of `q * scale`, one ulp).
    """

    codec_id = "int8"

    def __init__(self, encoder: EncoderConfig, window: int | None = None) -> None:
        super().__init__(encoder, window)
        self.groups = self.row_numel // encoder.head_dim  # L * 2 * H scales per position
        self.row_bytes = self.groups * 4 + self.row_numel

    def quantise(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """`rows [.., Dh]` -> (int8 codes, fp32 scales `[..]`)."""
        x = rows.detach().float()
        scale = x.abs().amax(-1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x / safe[..., None]).clamp(-127, 127).to(torch.int8)
        return q, scale

    def _rows_to_bytes(self, rows: Tensor) -> bytes:
        q, scale = self.quantise(rows.cpu())
        n = rows.shape[0]
        scales = scale.reshape(n, self.groups).numpy().view(np.uint8)
        parts = (scales, q.reshape(n, self.row_numel).numpy().view(np.uint8))
        return np.concatenate(parts, axis=1).tobytes()

    def _rows_from_bytes(self, data: memoryview, n: int) -> Tensor:
        raw = np.frombuffer(data, dtype=np.uint8).reshape(n, self.row_bytes)
        scale = raw[:, : self.groups * 4].copy().view(np.float32)
        q = raw[:, self.groups * 4:].view(np.int8).astype(np.float32)
        scales = torch.from_numpy(scale).reshape(n, *self.row_shape[:-1], 1)
        return torch.from_numpy(q).reshape(n, *self.row_shape) * scales

    @property
    def cost(self) -> Cost:
        return Cost(
            refresh="append: quantise one row (L*2*H scales)",
            serve="dequantise every row (one multiply per value); attention over all positions",
        )
