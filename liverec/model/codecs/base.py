"""The `StateCodec` interface and the tensor plumbing every codec shares.

A codec turns a batch of users' `KVCache` into one payload (bytes) per user and a list of
payloads back into a `KVCache` the heads can read (`model.user_hidden(cache)`,
`model.ranking_scores(cache, ...)`). Payloads are what the trainer writes into a state record
(`record.py`) after each micro-batch and what serving decodes per request.

Rows. Codecs work on *rows*: one slot's K and V of every layer and head, position-major,
`[.., L, 2, H, D/H]` (2 = K, V). Position-major layouts make appending an event a byte
concatenation and dropping the oldest a byte slice, which is what the incremental codecs do.

Positions. A cache from `SequentialRecommender.encode` / `SequenceEncoder.extend` holds each
user's most recent events, in order, without gaps in position: the valid slot with `j` valid
slots after it sits at position `next_pos - 1 - j`. Keys are stored already rotated (RoPE) to
their positions, so most codecs never need positions; `collective` stores keys un-rotated (so
that a pool shared by all users can hold them) and uses this rule to rotate them back.
"""

from __future__ import annotations

import abc
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from liverec.model.config import EncoderConfig
from liverec.model.encoder import KVCache, rope, rope_tables

if TYPE_CHECKING:
    from liverec.model.recommender import SequentialRecommender

#: Stored float formats: name -> (torch dtype, code byte in payloads). bf16 has no numpy dtype,
#: so it travels as its raw 16-bit pattern.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, 0),
    "bfloat16": (torch.bfloat16, 1),
    "float16": (torch.float16, 2),
}
_DTYPE_BY_CODE = {code: (name, dt) for name, (dt, code) in DTYPES.items()}
_RAW_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

#: Every payload starts with the user's next position and the number of stored slots.
HEAD = struct.Struct("<qI")

#: A learned codec's parameters travel in a published version's dense weights under this key
#: prefix (`liverec.params`), so they swap in atomically with the model they belong to.
PARAMS_PREFIX = "state_codec."


class PayloadError(ValueError):
    """A payload that does not fit the codec reading it (wrong length, dtype, shape)."""


@dataclass(frozen=True)
class Cost:
    """What a codec costs to keep fresh and to serve, in words (the benchmark measures µs).

    refresh: what the trainer does per touched user after a micro-batch.
    serve:   what serving does per request before scoring.
    """

    refresh: str
    serve: str


class StateCodec(abc.ABC):
    """Encodes users' K/V caches to one payload each and decodes payloads to a `KVCache`.

    `codec_id` and `version` go into every state record; a reader refuses records of another
    codec or of a version it does not know (`record.decode_record`). `incremental` codecs can
    `append` new events' K/V to a stored payload, byte-for-byte equal to re-encoding the
    extended cache; the others are recomputed from the user's history.
    """

    codec_id: str = ""
    version: int = 1
    incremental: bool = False
    #: Whether `decode` reads the learned parameters (`module`): then a payload decodes only with
    #: the parameters it was encoded with (the record's `params_version`). `summary` decodes
    #: without them (its payload holds plain K/V rows); `collective` needs its pool.
    decode_needs_params: bool = False

    def __init__(self, encoder: EncoderConfig) -> None:
        self.encoder = encoder

    # -- the interface ---------------------------------------------------------------------------

    @abc.abstractmethod
    def encode(self, cache: KVCache, model: SequentialRecommender | None = None) -> list[bytes]:
        """One payload per user of `cache` (any valid mask). `model` is needed by codecs that
        run the model while encoding (`pages`: the query token; `summary`: the summary tokens)."""

    @abc.abstractmethod
    def decode(self, payloads: Sequence[bytes], device: torch.device | str = "cpu") -> KVCache:
        """A float32 cache on `device` holding the decoded slots of each user, left-padded."""

    @abc.abstractmethod
    def bytes_per_user(self, history_len: int) -> int:
        """Payload bytes of a user with `history_len` events (exact; the tests check it)."""

    @property
    @abc.abstractmethod
    def cost(self) -> Cost:
        """Refresh and serve cost, in words."""

    def append(self, payloads: Sequence[bytes], new: KVCache) -> list[bytes]:
        """Append each user's new events (`new`: only their K/V, e.g. `last_events` of
        `SequenceEncoder.extend`'s cache, with `next_pos` after them) to its payload."""
        raise NotImplementedError(f"codec {self.codec_id!r} is not incremental: re-encode the history")

    @property
    def module(self) -> nn.Module | None:
        """Learned parameters (checkpointed and published with the dense weights), or None."""
        return None

    def describe(self) -> dict[str, object]:
        return {"codec": self.codec_id, "version": self.version, "incremental": self.incremental,
                "refresh": self.cost.refresh, "serve": self.cost.serve}

    # -- shapes ----------------------------------------------------------------------------------

    @property
    def row_shape(self) -> tuple[int, int, int, int]:
        e = self.encoder
        return (e.layers, 2, e.heads, e.head_dim)

    @property
    def row_numel(self) -> int:
        return int(np.prod(self.row_shape))


# -- rows <-> caches -------------------------------------------------------------------------------


def to_rows(cache: KVCache) -> Tensor:
    """`[B, S, L, 2, H, D/H]`: each slot's K and V of every layer, position-major."""
    kv = torch.stack([torch.stack(pair) for pair in cache.layers])  # [L, 2, B, H, S, Dh]
    return kv.permute(2, 4, 0, 1, 3, 5)


def from_rows(rows: Tensor, valid: Tensor, next_pos: Tensor) -> KVCache:
    """Inverse of `to_rows`."""
    kv = rows.permute(2, 3, 0, 4, 1, 5)  # [L, 2, B, H, S, Dh]
    return KVCache([(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])], valid, next_pos)


def user_rows(cache: KVCache) -> list[Tensor]:
    """Each user's valid rows in slot order, `[n_b, L, 2, H, D/H]`."""
    rows = to_rows(cache)
    return [rows[b][cache.valid[b]] for b in range(rows.shape[0])]


def pad_rows(rows: Sequence[Tensor], row_shape: Sequence[int], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Left-pad per-user rows into `[B, S, *row_shape]` and their valid mask `[B, S]`."""
    flat = torch.cat([r.float() for r in rows]) if rows else torch.zeros(0, *row_shape)
    return pad_flat_rows(flat, [r.shape[0] for r in rows], device)


def pad_flat_rows(flat: Tensor, counts: Sequence[int], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """`pad_rows` for rows already concatenated user after user: `flat [sum(counts), *row_shape]`."""
    n = torch.tensor(counts, dtype=torch.long)
    width = int(n.max()) if len(counts) else 0
    valid = (torch.arange(width)[None, :] >= (width - n)[:, None]).to(device)
    out = torch.zeros(len(counts), width, *flat.shape[1:], dtype=torch.float32, device=device)
    if width:
        out[valid] = flat.to(device, torch.float32)
    return out, valid


def slot_positions(valid: Tensor, next_pos: Tensor) -> Tensor:
    """`[B, S]` absolute position of each valid slot (see the module docstring); padding gets
    the position of the next valid slot, which never matters."""
    after = valid.long().flip(1).cumsum(1).flip(1)  # valid slots at or after each slot
    return next_pos[:, None] - after


def last_events(cache: KVCache, counts: Tensor) -> KVCache:
    """Each user's last `counts[b]` valid slots (the events just appended by `extend`), left-padded.

    This is what `StateCodec.append` takes: `extend` returns the whole extended cache, and the
    new events are the newest valid slots of each row.
    """
    after = cache.valid.long().flip(1).cumsum(1).flip(1)
    keep = cache.valid & (after <= counts.to(after.device)[:, None])
    rows = user_rows(KVCache(cache.layers, keep, cache.next_pos))
    shape = rows[0].shape[1:] if rows else (len(cache.layers), 2, 1, 1)
    padded, valid = pad_rows(rows, shape, cache.valid.device)
    return from_rows(padded.to(cache.layers[0][0].dtype), valid, cache.next_pos)


def rotate_keys(rows: Tensor, positions: Tensor, base: float, inverse: bool = False) -> Tensor:
    """Rotate the K half of `rows [B, S, L, 2, H, Dh]` to `positions [B, S]` (or back, `inverse`)."""
    cos, sin = rope_tables(positions, rows.shape[-1], base, rows.dtype)
    cos, sin = cos[:, :, None, None], sin[:, :, None, None]  # over L and H
    k = rope(rows[:, :, :, 0], cos, -sin if inverse else sin)
    return torch.stack((k, rows[:, :, :, 1]), dim=3)


# -- bytes -----------------------------------------------------------------------------------------


def tensor_bytes(t: Tensor, dtype: torch.dtype) -> bytes:
    """`t` cast to `dtype`, as little-endian bytes (bf16 as its bit pattern)."""
    return t.detach().to("cpu", dtype).contiguous().view(_RAW_INT.get(dtype, dtype)).numpy().tobytes()


def tensor_from(data: bytes | memoryview, dtype: torch.dtype, shape: Sequence[int]) -> Tensor:
    """Inverse of `tensor_bytes` (a float32 copy)."""
    raw = _RAW_INT.get(dtype, dtype)
    np_dtype = torch.empty(0, dtype=raw).numpy().dtype
    arr = np.frombuffer(data, dtype=np_dtype)
    return torch.from_numpy(arr.copy()).view(dtype).reshape(tuple(shape)).float()


def dtype_named(field: str, name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{field}: must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name][0]


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def dtype_code(dtype: torch.dtype) -> int:
    return next(code for dt, code in DTYPES.values() if dt == dtype)


def dtype_of_code(code: int, codec_id: str) -> torch.dtype:
    if code not in _DTYPE_BY_CODE:
        raise PayloadError(f"{codec_id}: unknown stored dtype code {code}")
    return _DTYPE_BY_CODE[code][1]


def read_head(payload: bytes | memoryview, codec_id: str) -> tuple[int, int]:
    if len(payload) < HEAD.size:
        raise PayloadError(f"{codec_id}: payload of {len(payload)} bytes is shorter than its header")
    return HEAD.unpack_from(payload)


def check_length(payload: bytes | memoryview, expected: int, codec_id: str) -> None:
    if len(payload) != expected:
        raise PayloadError(f"{codec_id}: payload has {len(payload)} bytes, its header implies {expected}")
