"""State records: round trip, refusal of versions the reader cannot decode, corruption as its own error."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liverec.model import EncoderConfig
from liverec.model.codecs import (
    ChecksumMismatch,
    CorruptRecord,
    StateRecord,
    UnsupportedVersion,
    codec_from_config,
    decode_record,
    encode_record,
    record_for,
)
from liverec.model.codecs.record import FORMAT_VERSION, MAGIC

ENC = EncoderConfig(dim=16, layers=2, heads=2, max_len=12, dropout=0.0)
RECORD = StateRecord("window", 1, model_version=7, last_offset=123_456, last_event_time_ms=1_700_000_000_123,
                     payload=bytes(range(200)), params_version=5)


def reseal(data: bytes) -> bytes:
    """Recompute the crc32 trailer after an intended edit."""
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def test_round_trip_keeps_every_field() -> None:
    assert decode_record(encode_record(RECORD)) == RECORD
    empty = StateRecord("full", 3, 0, -1, 0, b"")
    assert decode_record(encode_record(empty)) == empty


def test_record_for_a_codec_is_read_back_by_that_codec(make_cache) -> None:
    codec = codec_from_config("int8", ENC)
    payload = codec.encode(make_cache(1, 5))[0]
    data = record_for(codec, payload, model_version=2, last_offset=99, last_event_time_ms=5)
    record = decode_record(data, codec)
    assert (record.codec_id, record.codec_version, record.model_version, record.payload) == ("int8", 1, 2, payload)
    assert record.params_version == 0  # int8 has no learned parameters
    learned = decode_record(record_for(codec, payload, 9, 99, 5, params_version=8), codec)
    assert (learned.model_version, learned.params_version) == (9, 8)


def test_unknown_codec_version_is_refused_by_name() -> None:
    codec = codec_from_config("window", ENC)
    newer = encode_record(StateRecord("window", 2, 1, 0, 0, b"x"))
    with pytest.raises(UnsupportedVersion, match=r"codec 'window' version 2, this reader decodes 'window' version 1"):
        decode_record(newer, codec)
    assert decode_record(newer).codec_version == 2  # without a codec, the header still parses


def test_other_codec_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedVersion, match=r"codec 'window' version 1, this reader decodes codec 'collective'"):
        decode_record(encode_record(RECORD), codec_from_config("collective", ENC))


def test_unknown_format_version_is_refused() -> None:
    data = bytearray(encode_record(RECORD))
    struct.pack_into("<H", data, 4, FORMAT_VERSION + 1)
    message = f"format version {FORMAT_VERSION + 1}, this reader decodes format version {FORMAT_VERSION}"
    with pytest.raises(UnsupportedVersion, match=message):
        decode_record(reseal(bytes(data)))


def test_version_is_not_misread_when_corrupted() -> None:
    """A flipped bit in the format version field is corruption (checksum first), not a version."""
    data = bytearray(encode_record(RECORD))
    data[4] ^= 0x01
    with pytest.raises(ChecksumMismatch):
        decode_record(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_bit_flip_is_a_checksum_mismatch(data) -> None:
    record = encode_record(RECORD)
    bit = data.draw(st.integers(0, len(record) * 8 - 1))
    flipped = bytearray(record)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptRecord) as info:
        decode_record(bytes(flipped))
    if bit // 8 >= 4:  # past the magic: verified by the checksum
        assert isinstance(info.value, ChecksumMismatch)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 299))
def test_truncated_records_are_corrupt(cut) -> None:
    record = encode_record(RECORD)
    with pytest.raises(CorruptRecord):
        decode_record(record[: cut % len(record)])


def test_inconsistent_length_is_corrupt_even_with_a_good_checksum() -> None:
    data = encode_record(RECORD)
    with pytest.raises(CorruptRecord, match="payload length"):
        decode_record(reseal(data[:-5] + data[-4:]))  # one payload byte gone, crc recomputed


def test_not_a_record() -> None:
    with pytest.raises(CorruptRecord, match="not a state record"):
        decode_record(b"hello world, this is not it")
    assert MAGIC == encode_record(RECORD)[:4]


def test_codec_id_must_be_ascii_and_short() -> None:
    with pytest.raises(ValueError, match="codec_id"):
        encode_record(StateRecord("", 1, 0, 0, 0, b""))
    with pytest.raises(ValueError, match="codec_id"):
        encode_record(StateRecord("x" * 256, 1, 0, 0, 0, b""))
