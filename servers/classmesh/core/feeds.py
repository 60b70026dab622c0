"""The one implementation behind every live feed RPC (WatchSession, Subscribe, ...).

A feed validates the cursor, checks that the session belongs to the caller's tenant, then
streams `classmesh.events.v1.Event`s from `Bus.subscribe`: first what the caller missed
after `after_seq` (from PostgreSQL), then live, gap-free and in order (see core/bus.py).
Services only choose which event types their feed carries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection

from classmesh.core.errors import InvalidArgument, Validator
from classmesh.core.eventproto import EVENT_TYPES, to_event
from classmesh.core.events import last_seq
from classmesh.core.runtime import Runtime
from classmesh.events.v1 import events_pb2

__all__ = ["event_feed", "MAX_SEQ"]

#: Largest cursor accepted (seq is a PostgreSQL bigint).
MAX_SEQ = 2**63 - 1


async def event_feed(
    runtime: Runtime,
    *,
    tenant_id: str,
    session_id: str,
    after_seq: int,
    types: Collection[str] | None = None,
) -> AsyncIterator[events_pb2.Event]:
    """Typed events of one session with `seq > after_seq`, replayed then live."""
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
            yield to_event(record)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
