"""The event log's (type, JSON payload) form converts losslessly to the typed envelope."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf import json_format

from classmesh.common.v1 import common_pb2
from classmesh.core.eventproto import EVENT_TYPES, actor_dict, log_payload, to_event
from classmesh.core.events import EventRecord
from classmesh.events.v1 import events_pb2


def _record(type_: str, payload: dict[str, object], actor: dict[str, object]) -> EventRecord:
    return EventRecord(
        tenant_id="00000000-0000-0000-0000-000000000001",
        session_id="00000000-0000-0000-0000-000000000002",
        seq=7,
        type=type_,
        payload=payload,
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        actor=actor,
        request_id="r-1",
    )


def test_every_oneof_member_is_an_event_type() -> None:
    oneof = events_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"]
    assert EVENT_TYPES == {f.name for f in oneof.fields}
    assert "chat_message_posted" in EVENT_TYPES


@pytest.mark.parametrize("field", sorted(EVENT_TYPES))
def test_round_trip_of_each_payload_type(field: str) -> None:
    descriptor = events_pb2.Event.DESCRIPTOR.fields_by_name[field].message_type
    cls = type(getattr(events_pb2.Event(), field))
    message = cls()
    # Fill one scalar field, if any, so the round trip carries data.
    for f in descriptor.fields:
        if f.type == f.TYPE_STRING and not f.is_repeated:
            setattr(message, f.name, "value-" + f.name)
            break
    type_, payload = log_payload(message)
    assert type_ == field
    actor = common_pb2.Actor(user_id="u-1", display_name="Ada", role=common_pb2.ROLE_STUDENT)
    event = to_event(_record(type_, payload, actor_dict(actor)))
    assert event.WhichOneof("payload") == field
    assert getattr(event, field) == message
    assert event.actor == actor
    assert event.seq == 7 and event.request_id == "r-1"
    assert event.time.ToDatetime(tzinfo=UTC) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_non_payload_message_is_rejected() -> None:
    with pytest.raises(TypeError):
        log_payload(common_pb2.Actor())


def test_payload_json_is_protobuf_json() -> None:
    msg = events_pb2.Event().chat_message_posted
    msg.message.id = "m-1"
    _, payload = log_payload(msg)
    assert payload == json_format.MessageToDict(msg, preserving_proto_field_name=True)
