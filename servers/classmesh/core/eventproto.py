"""The bridge between the event log (type + JSON payload) and the typed protobuf envelope.

Services build a payload message (e.g. `events_pb2.ChatMessagePosted(...)`) and call
`log_payload()` to get the `(type, payload)` pair `append_event` stores; every live feed
turns the `EventRecord`s it gets from the bus back into `events_pb2.Event` with
`to_event()`. The stored `type` is the name of the field in the `Event.payload` oneof, and
the stored payload is that message in protobuf JSON, so the log, the bus and replay all
carry exactly what the typed envelope carries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
from google.protobuf import json_format
from google.protobuf.message import Message

from classmesh.common.v1 import common_pb2
from classmesh.core.events import EventRecord, append_event
from classmesh.core.timeutil import to_timestamp
from classmesh.events.v1 import events_pb2

__all__ = ["EVENT_TYPES", "ROLES", "EventBatch", "actor_dict", "log_payload", "to_event"]

_ONEOF = events_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"]
#: payload message full name -> oneof field name (the stored `type`).
_FIELD_BY_MESSAGE = {f.message_type.full_name: f.name for f in _ONEOF.fields if f.message_type}
#: Token/database role words <-> `classmesh.common.v1.Role`, for every service.
ROLES: dict[str, common_pb2.Role.ValueType] = {
    "instructor": common_pb2.ROLE_INSTRUCTOR,
    "assistant": common_pb2.ROLE_ASSISTANT,
    "student": common_pb2.ROLE_STUDENT,
    "guest": common_pb2.ROLE_GUEST,
    "admin": common_pb2.ROLE_ADMIN,
}
#: Every event type the log can hold.
EVENT_TYPES = frozenset(f.name for f in _ONEOF.fields)


def log_payload(payload: Message) -> tuple[str, dict[str, Any]]:
    """`(type, payload_json)` of a payload message, for `append_event`."""
    name = _FIELD_BY_MESSAGE.get(payload.DESCRIPTOR.full_name)
    if name is None:
        raise TypeError(f"{payload.DESCRIPTOR.full_name} is not an Event payload")
    return name, json_format.MessageToDict(payload, preserving_proto_field_name=True)


def actor_dict(actor: common_pb2.Actor) -> dict[str, Any]:
    return json_format.MessageToDict(actor, preserving_proto_field_name=True)


def to_event(record: EventRecord) -> events_pb2.Event:
    """The typed envelope of one logged event."""
    event = events_pb2.Event(
        seq=record.seq,
        session_id=record.session_id,
        breakout_room_id=record.breakout_room_id or "",
        request_id=record.request_id or "",
    )
    event.time.CopyFrom(to_timestamp(record.created_at))
    if record.actor:
        json_format.ParseDict(dict(record.actor), event.actor, ignore_unknown_fields=True)
    if record.type in EVENT_TYPES:
        target = getattr(event, record.type)
        json_format.ParseDict(_plain(record.payload), target, ignore_unknown_fields=True)
        # An empty payload message still marks which event this is.
        target.SetInParent()
    return event


def _plain(payload: Mapping[str, Any]) -> dict[str, Any]:
    return dict(payload)


class EventBatch:
    """The typed events one mutation appends, in its transaction.

    The mutation's `request_id` goes on the first event only (`session_events` keeps
    `(session_id, request_id)` unique); `records` is what `run_mutation` publishes.
    """

    def __init__(
        self, tenant_id: str, session_id: str, actor: Mapping[str, Any], request_id: str | None
    ) -> None:
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.actor = dict(actor)
        self.request_id = request_id or None
        self.records: list[EventRecord] = []

    async def add(
        self,
        conn: asyncpg.Connection,
        payload: Message,
        room: str | None = None,
        *,
        actor: Mapping[str, Any] | None = None,
    ) -> EventRecord:
        type_, body = log_payload(payload)
        record = await append_event(
            conn,
            tenant_id=self.tenant_id,
            session_id=self.session_id,
            type=type_,
            payload=body,
            actor=self.actor if actor is None else actor,
            request_id=None if self.records else self.request_id,
            breakout_room_id=room,
        )
        self.records.append(record)
        return record

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq if self.records else 0
