"""The one implementation behind every live feed RPC (WatchSession, Subscribe, ...).

A feed validates the cursor, checks that the session belongs to the caller's tenant, then
streams `classmesh.events.v1.Event`s from `Bus.subscribe`: first what the caller missed
after `after_seq` (from PostgreSQL), then live, gap-free and in order (see core/bus.py).
Services only choose which event types their feed carries and, for room-scoped feeds,
which room (`Scope`): events carry `breakout_room_id`, and an event of one breakout room
never reaches a feed of another room or of the main room; main-room (session-wide) events
reach a breakout room's feed only when their type is one of the scope's `announcements`.

Every subscriber of a session in this process gets the same `EventRecord` from the bus, so
the typed envelope is built once per event (a small cache keyed by session and seq), not
once per subscriber: the `Event` a feed yields is shared and must not be modified (copy it
first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass

from classmesh.core.errors import InvalidArgument, Validator
from classmesh.core.eventproto import EVENT_TYPES, to_event
from classmesh.core.events import EventRecord, last_seq
from classmesh.core.runtime import Runtime
from classmesh.events.v1 import events_pb2

__all__ = ["event_feed", "MAX_SEQ", "Scope"]

#: Largest cursor accepted (seq is a PostgreSQL bigint).
MAX_SEQ = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Scope:
    """The room a feed follows: the main room (`breakout_room_id` None) or one breakout room.

    `announcements`: types of main-room events that also reach a breakout room's feed
    (session end, breakout broadcasts).
    """

    breakout_room_id: str | None = None
    announcements: frozenset[str] = frozenset()

    def admits(self, record: EventRecord) -> bool:
        room = record.breakout_room_id
        if room == self.breakout_room_id:
            return True
        return room is None and record.type in self.announcements


#: Typed envelopes of recent events, shared by every feed of this process, with the record
#: each was built from: a record read again later (a replay, a redacted payload) is reused
#: only when it is equal, so a changed row is never served from the cache.
_CACHE_SIZE = 4096
_converted: OrderedDict[tuple[str, str, int], tuple[EventRecord, events_pb2.Event]] = OrderedDict()


def _typed(record: EventRecord) -> events_pb2.Event:
    key = (record.tenant_id, record.session_id, record.seq)
    hit = _converted.get(key)
    if hit is not None and (hit[0] is record or hit[0] == record):
        return hit[1]
    event = to_event(record)
    _converted[key] = (record, event)
    if len(_converted) > _CACHE_SIZE:
        _converted.popitem(last=False)
    return event


async def event_feed(
    runtime: Runtime,
    *,
    tenant_id: str,
    session_id: str,
    after_seq: int,
    types: Collection[str] | None = None,
    scope: Scope | None = None,
) -> AsyncIterator[events_pb2.Event]:
    """Typed events of one session with `seq > after_seq`, replayed then live.

    `scope` None: every room; otherwise only what `scope.admits`.
    """
    v = Validator()
    session_id = v.require_uuid("session_id", session_id)
    v.require_range("after_seq", after_seq, 0, MAX_SEQ)
    v.raise_if_any()
    if types is not None and not set(types) <= EVENT_TYPES:
        raise ValueError(f"unknown event types: {sorted(set(types) - EVENT_TYPES)}")
    head = await last_seq(runtime.pool, tenant_id=tenant_id, session_id=session_id)
    if after_seq > head:
        raise InvalidArgument(
            [("after_seq", f"is beyond the session's newest event ({head})")],
        )
    stream = runtime.bus.subscribe(
        tenant_id=tenant_id, session_id=session_id, after_seq=after_seq, types=types
    )
    try:
        async for record in stream:
            if scope is None or scope.admits(record):
                yield _typed(record)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
