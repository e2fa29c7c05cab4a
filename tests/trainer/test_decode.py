"""Every kind of bad event is refused with its own reason; good events keep order and fields."""

import math
import struct
from dataclasses import dataclass

import pytest
from google.protobuf import descriptor_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from liverec.platform.events import MAX_ID, MIN_EVENT_TIME_MS, encode_event
from liverec.trainer.decode import REASONS, Rejected, _parse_payloads, _parse_with_protobuf, decode_records
from liverec.v1 import events_pb2

NOW_MS = 1_800_000_000_000
T = 1_700_000_000_000


@dataclass
class Rec:
    value: bytes | None
    partition: int = 0
    offset: int = 0
    topic: str = "events"
    key: bytes | None = None


def ev(**overrides) -> bytes:
    fields = dict(user_id=7, item_id=9, action=events_pb2.ACTION_CLICK, event_time_ms=T)
    fields.update(overrides)
    return events_pb2.UserEvent(**fields).SerializeToString()


BAD = {
    "undecodable": [b"\xff\xff\xff\xff", None],
    "wrong_schema": [descriptor_pb2.FileDescriptorProto(name="x.proto", package="p").SerializeToString(),
                     ev(action=77)],
    "missing_field": [ev(user_id=0), ev(item_id=0), ev(action=events_pb2.ACTION_UNSPECIFIED), ev(event_time_ms=0)],
    "id_out_of_range": [ev(user_id=-5), ev(item_id=2**62)],
    "time_out_of_range": [ev(event_time_ms=MIN_EVENT_TIME_MS - 1), ev(event_time_ms=NOW_MS + 25 * 3600 * 1000)],
    "nan_value": [ev(value=math.nan), ev(value=math.inf)],
}


def test_reasons_cover_the_documented_kinds() -> None:
    assert set(BAD) == set(REASONS)


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_kind_gets_its_reason(reason: str) -> None:
    records = [Rec(raw, offset=i) for i, raw in enumerate(BAD[reason])]
    batch, rejected = decode_records(records, now_ms=NOW_MS)
    assert len(batch) == 0
    assert [r.reason for r in rejected] == [reason] * len(records)
    assert [r.record.value for r in rejected] == [r.value for r in records]  # original bytes kept
    assert all(r.detail for r in rejected)


def test_good_events_survive_between_bad_ones_in_order() -> None:
    good = [encode_event(u, 100 + u, events_pb2.ACTION_RATE, u / 2, T + u) for u in range(1, 6)]
    good[2] = encode_event(3, 103, events_pb2.ACTION_VIEW, math.nan, T + 3)
    mixed = []
    for i, raw in enumerate(good):
        mixed.append(raw)
        mixed.append(BAD[REASONS[i]][0])
    records = [Rec(raw, partition=1, offset=i) for i, raw in enumerate(mixed)]
    batch, rejected = decode_records(records, now_ms=NOW_MS)
    assert batch.user_id.tolist() == [1, 2, 3, 4, 5]
    assert batch.item_id.tolist() == [101, 102, 103, 104, 105]
    assert batch.event_time_ms.tolist() == [T + u for u in range(1, 6)]
    assert batch.offset.tolist() == [0, 2, 4, 6, 8]
    assert batch.partition.tolist() == [1] * 5
    assert math.isnan(batch.value[2]) and batch.value[0] == 0.5
    assert batch.action.tolist() == [5, 5, 1, 5, 5]
    assert [r.reason for r in rejected] == list(REASONS[:5])


# --------------------------------------------------------------------------- the compiled parse

INT64 = st.integers(-(2**63), 2**63 - 1)
EVENTS = st.builds(
    lambda value, **fields: ev(**fields, **({} if value is None else {"value": value})),
    user_id=INT64, item_id=INT64, action=st.integers(-(2**31), 2**31 - 1), event_time_ms=INT64,
    value=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    context=st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2) | st.just({}),
)


@st.composite
def payloads(draw) -> bytes:
    """UserEvents, and what a stream may also carry: two messages back to back (repeated fields:
    the last wins), a message cut short, stray bytes appended, and bytes that are no message."""
    kind = draw(st.sampled_from(["event", "two", "cut", "appended", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=40))
    first = draw(EVENTS)
    if kind == "two":
        return first + draw(EVENTS)
    if kind == "cut":
        return first[: draw(st.integers(0, max(len(first) - 1, 0)))]
    if kind == "appended":
        return first + draw(st.binary(min_size=1, max_size=6))
    return first


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_parse_agrees_with_protobuf(raws: list[bytes]) -> None:
    """What the compiled parse claims complete, protobuf parses to the same fields, bit for bit,
    with no unknown fields; it never takes a record protobuf refuses."""
    complete, ints, value, has_value = _parse_payloads(raws)
    for i, raw in enumerate(raws):
        reference = _parse_with_protobuf(Rec(raw))
        if not complete[i]:
            continue
        assert not isinstance(reference, Rejected), raw
        user, item, action, val, ts, unknown, present = reference
        assert (ints[i].tolist(), bool(has_value[i]), unknown) == ([user, item, action, ts], present, 0), raw
        assert _bits(value[i]) == _bits(val) if present else math.isnan(value[i])


@settings(max_examples=300, deadline=None)
@given(st.lists(payloads(), min_size=1, max_size=12))
def test_the_compiled_parse_agrees_with_protobuf_on_every_record_it_takes(raws: list[bytes]) -> None:
    """... and decode_records refuses as undecodable exactly what protobuf cannot parse."""
    assert_parse_agrees_with_protobuf(raws)
    records = [Rec(raw, offset=i) for i, raw in enumerate(raws)]
    batch, rejected = decode_records(records, now_ms=NOW_MS)
    assert len(batch) + len(rejected) == len(records)
    for r in rejected:
        reference = _parse_with_protobuf(r.record)
        assert isinstance(reference, Rejected) == (r.reason == "undecodable")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_the_compiled_parse_agrees_with_protobuf_on_every_prefix_and_odd_encodings() -> None:
    """Every truncation of events with and without a value (a double cut short among them), each
    followed by a whole event so that a parse running past its record's end would read it; and
    hand-made encodings: an enum beyond int32, overlong and over-long varints, a known field with
    another wire type, field 0, a field UserEvent lacks."""
    events = [ev(value=1.5), ev(user_id=-3, value=-0.0), ev(), encode_event(2**62, 1, 4, math.nan, T)]
    after = ev(user_id=99)
    for raw in events:
        assert_parse_agrees_with_protobuf([part for k in range(len(raw) + 1) for part in (raw[:k], after)])
    crafted = [
        b"\x18" + _varint(2**32 + 5),     # action beyond int32: protobuf keeps the low 32 bits
        b"\x18" + _varint(2**31),
        b"\x08\x87\x80\x80\x00",          # overlong varint: still 7
        b"\x08" + b"\xff" * 9 + b"\x7f",  # a tenth byte beyond the top bit
        b"\x08" + b"\xff" * 10 + b"\x01", # eleven bytes
        b"\x20" + _varint(5),             # value (a double) as a varint
        b"\x09" + b"\x00" * 8,           # user_id as fixed64
        b"\x00\x01",                      # field 0
        b"\x38\x01",                      # field 7, not in UserEvent
        b"\x8a\x80\x80\x80\x80\x01",      # a six-byte tag
    ]
    assert_parse_agrees_with_protobuf([part for raw in crafted for part in (raw, after)])


@pytest.mark.parametrize("value", [math.nan, 0.0, -2.5, math.inf])
@pytest.mark.parametrize("user", [1, 2**62, -1, MAX_ID - 1])
def test_what_liverec_producers_write_takes_the_compiled_parse(user: int, value: float) -> None:
    complete, ints, out, has_value = _parse_payloads([encode_event(user, 5, events_pb2.ACTION_PURCHASE, value, T)])
    assert complete[0]
    assert ints[0].tolist() == [user, 5, events_pb2.ACTION_PURCHASE, T]
    assert bool(has_value[0]) == (not math.isnan(value)) and (math.isnan(out[0]) or out[0] == value)
