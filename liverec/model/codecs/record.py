"""The state record: what the trainer writes per user (RocksDB value, compacted-topic value).

Layout (little-endian):

    magic          4 bytes  b"LVST"
    format         u16      FORMAT_VERSION of this layout
    codec id len   u8, then the codec id (ASCII)
    codec version  u16
    model version  u64      the dense model version whose encoder produced the state (for a
                            state appended to, the oldest version among its parts)
    params version u64      the model version whose published codec parameters encoded the
                            payload (0: the codec has no learned parameters); a codec whose
                            decode needs its parameters (`collective`) decodes with exactly those
    last offset    i64      offset of the last event the state includes (-1: none)
    last time ms   i64      event time of that event
    payload len    u32
    payload        payload len bytes (the codec's)
    crc32          u32      zlib.crc32 of every byte before it

The checksum is a trailer, so it can be verified before anything else is trusted, whatever the
format version: a flipped bit in a version field reads as corruption (`ChecksumMismatch`, which
serving turns into a miss plus a metric), not as a version it cannot decode. Only an intact
record with an unknown format version, another codec, or a codec version the reader does not
know raises `UnsupportedVersion`, with a message naming what was found and what is supported.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from liverec.model.codecs.base import StateCodec

MAGIC = b"LVST"
FORMAT_VERSION = 2
_PREFIX = struct.Struct("<4sHB")  # magic, format, codec id length
_FIELDS = struct.Struct("<HQQqqI")  # codec version, model and params versions, offset, time, payload length
_CRC = struct.Struct("<I")


class RecordError(ValueError):
    """A state record that cannot be used."""


class CorruptRecord(RecordError):
    """Damaged bytes (bad magic, truncated, inconsistent lengths): a miss, never a crash."""


class ChecksumMismatch(CorruptRecord):
    """The trailer's crc32 does not match the record's bytes."""


class UnsupportedVersion(RecordError):
    """An intact record this reader cannot decode (format, codec, or codec version)."""


@dataclass(frozen=True)
class StateRecord:
    codec_id: str
    codec_version: int
    model_version: int
    last_offset: int
    last_event_time_ms: int
    payload: bytes
    params_version: int = 0


def encode_record(record: StateRecord) -> bytes:
    codec = record.codec_id.encode("ascii")
    if not 0 < len(codec) < 256:
        raise ValueError(f"codec_id: must be 1..255 ASCII characters, got {record.codec_id!r}")
    body = (
        _PREFIX.pack(MAGIC, FORMAT_VERSION, len(codec))
        + codec
        + _FIELDS.pack(
            record.codec_version, record.model_version, record.params_version, record.last_offset,
            record.last_event_time_ms, len(record.payload),
        )
        + record.payload
    )
    return body + _CRC.pack(zlib.crc32(body))


def decode_record(data: bytes, codec: StateCodec | None = None) -> StateRecord:
    """Parse and verify a record; with `codec`, also refuse one that codec cannot decode."""
    view = memoryview(data)
    if len(view) < _PREFIX.size + _CRC.size or bytes(view[:4]) != MAGIC:
        raise CorruptRecord(f"state record: not a state record ({len(view)} bytes, magic {bytes(view[:4])!r})")
    (crc,) = _CRC.unpack_from(view, len(view) - _CRC.size)
    if zlib.crc32(view[: -_CRC.size]) != crc:
        raise ChecksumMismatch(f"state record: crc32 mismatch over {len(view)} bytes (stored {crc:#010x})")
    _, fmt, id_len = _PREFIX.unpack_from(view)
    if fmt != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"state record: format version {fmt}, this reader decodes format version {FORMAT_VERSION}"
        )
    start = _PREFIX.size + id_len
    if len(view) < start + _FIELDS.size + _CRC.size:
        raise CorruptRecord(f"state record: {len(view)} bytes, too short for its header")
    codec_id = bytes(view[_PREFIX.size:start]).decode("ascii", errors="replace")
    codec_version, model_version, params_version, offset, time_ms, length = _FIELDS.unpack_from(view, start)
    body = start + _FIELDS.size
    if body + length + _CRC.size != len(view):
        raise CorruptRecord(f"state record: payload length {length} does not match {len(view)} record bytes")
    if codec is not None:
        if codec_id != codec.codec_id:
            raise UnsupportedVersion(
                f"state record: codec {codec_id!r} version {codec_version}, this reader decodes "
                f"codec {codec.codec_id!r} version {codec.version}"
            )
        if codec_version != codec.version:
            raise UnsupportedVersion(
                f"state record: codec {codec_id!r} version {codec_version}, this reader decodes "
                f"{codec_id!r} version {codec.version} only"
            )
    payload = bytes(view[body: body + length])
    return StateRecord(codec_id, codec_version, model_version, offset, time_ms, payload, params_version)


def record_for(
    codec: StateCodec, payload: bytes, model_version: int, last_offset: int, last_event_time_ms: int,
    params_version: int = 0,
) -> bytes:
    """The record of one user's payload as `codec` wrote it (with the codec parameters of
    model version `params_version`, 0 for a codec without learned parameters)."""
    record = StateRecord(codec.codec_id, codec.version, model_version, last_offset, last_event_time_ms, payload,
                         params_version)
    return encode_record(record)
