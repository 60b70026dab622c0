"""SQL of MediaService: who may signal, breakout rooms, the track events of the session log."""

from __future__ import annotations

import uuid

import asyncpg

from classmesh.core.errors import NotFound
from classmesh.core.eventproto import actor_dict, log_payload
from classmesh.core.events import EventRecord, append_event
from classmesh.events.v1 import events_pb2
from classmesh.media.v1 import media_pb2

__all__ = ["append_track_event", "require_breakout_room"]


async def require_breakout_room(
    conn: asyncpg.Connection, tenant_id: str, session_id: str, room_id: str
) -> None:
    """NOT_FOUND unless the breakout room belongs to the session (and tenant)."""
    found = await conn.fetchval(
        "SELECT 1 FROM breakout_rooms WHERE id = $1 AND session_id = $2 AND tenant_id = $3",
        uuid.UUID(room_id),
        uuid.UUID(session_id),
        uuid.UUID(tenant_id),
    )
    if not found:
        raise NotFound("breakout_room", room_id)


async def append_track_event(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    track: media_pb2.Track,
    published: bool,
    actor: object | None = None,
) -> EventRecord:
    payload = (
        events_pb2.TrackPublished(track=track)
        if published
        else events_pb2.TrackUnpublished(track=track)
    )
    kind, body = log_payload(payload)
    return await append_event(
        conn,
        tenant_id=tenant_id,
        session_id=track.session_id,
        type=kind,
        payload=body,
        actor=actor_dict(actor) if actor is not None else None,  # type: ignore[arg-type]
        breakout_room_id=track.breakout_room_id or None,
    )
