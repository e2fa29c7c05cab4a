"""The Python stubs are generated from proto/ at set-up; they must match the .proto exactly."""

from pathlib import Path

from liverec.platform import protogen
from liverec.v1 import events_pb2

GENERATED = Path(events_pb2.__file__).parent


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    fresh = protogen.generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        checked_out = GENERATED / path.name
        assert checked_out.exists(), f"{checked_out} missing: run `make setup`"
        assert checked_out.read_bytes() == path.read_bytes(), f"{path.name} is stale or edited: run `make setup`"


def test_descriptor_has_the_documented_fields() -> None:
    fields = {f.name: f for f in events_pb2.UserEvent.DESCRIPTOR.fields}
    assert set(fields) == {"user_id", "item_id", "action", "value", "event_time_ms", "context"}
    assert fields["user_id"].cpp_type == fields["user_id"].CPPTYPE_INT64
    assert fields["item_id"].cpp_type == fields["item_id"].CPPTYPE_INT64
    assert fields["value"].has_presence
    actions = set(events_pb2.Action.keys())
    assert {"ACTION_VIEW", "ACTION_CLICK", "ACTION_LIKE", "ACTION_PURCHASE", "ACTION_RATE"} <= actions


def test_round_trip_keeps_every_field() -> None:
    event = events_pb2.UserEvent(user_id=2**40 + 3, item_id=2**50 + 7, action=events_pb2.ACTION_RATE, value=4.5,
                                 event_time_ms=1_700_000_000_123, context={"device": "ios", "arm": "b"})
    back = events_pb2.UserEvent.FromString(event.SerializeToString())
    assert back == event
    assert back.HasField("value")
    assert not events_pb2.UserEvent(user_id=1).HasField("value")
