"""The one place that decides "is this session usable" and "is this caller a participant".

Every service that acts inside a session (Session, Interaction, Breakout, Media, Recording)
asks here, so the answers (and their error reasons) never drift apart:

    session = await require_live_session(conn, tenant_id, session_id)             # usable
    session = await require_live_session(conn, tenant_id, session_id, live=True)  # and LIVE
    me = await require_participant(conn, tenant_id, session_id, principal.subject)

| situation                                         | error                                    |
|---------------------------------------------------|------------------------------------------|
| no such session in the tenant, or soft-deleted    | NOT_FOUND            NOT_FOUND           |
| the session ended                                 | FAILED_PRECONDITION  SESSION_ENDED       |
| the session was cancelled                         | FAILED_PRECONDITION  SESSION_CANCELLED   |
| `live=True` and the session has not started       | FAILED_PRECONDITION  SESSION_NOT_LIVE    |
| the caller never joined, or left                  | PERMISSION_DENIED    NOT_IN_SESSION      |
| the caller was removed (every token of theirs)    | PERMISSION_DENIED    PARTICIPANT_REMOVED |
| `admitted=True` and the caller waits in the lobby | PERMISSION_DENIED    NOT_ADMITTED        |

The pure `check_*` functions hold the rules; the `require_*` coroutines add the one query
each. SessionService reads richer rows itself and calls the `check_*` functions on them.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from classmesh.core.errors import FailedPrecondition, NotFound, PermissionDenied

__all__ = [
    "ACTIVE_STATUSES",
    "ParticipantRef",
    "SessionRef",
    "check_live",
    "check_not_removed",
    "check_participant",
    "check_usable",
    "fetch_session",
    "require_live_session",
    "require_not_removed",
    "require_participant",
]

#: Participant statuses that are "in the session" (and hold a seat).
ACTIVE_STATUSES = frozenset({"lobby", "admitted", "disconnected"})


@dataclass(frozen=True, slots=True)
class SessionRef:
    """What other services need to know of a session."""

    id: str
    tenant_id: str
    kind: str  # 'class' | 'study_room'
    status: str  # 'scheduled' | 'live' | 'ended' | 'cancelled'
    instructor_id: str
    scheduled_start: datetime
    scheduled_end: datetime
    capacity: int
    current_occupancy: int
    settings: Mapping[str, Any]
    recording_enabled: bool
    media_router_id: str | None


@dataclass(frozen=True, slots=True)
class ParticipantRef:
    """A user's membership of a session."""

    id: str
    session_id: str
    user_id: str
    display_name: str
    role: str  # 'instructor' | 'assistant' | 'student' | 'guest' | 'admin'
    status: str  # 'lobby' | 'admitted' | 'disconnected' | 'left' | 'removed'
    guest: bool


# ---------------------------------------------------------------------------- rules


def check_usable(session_id: str, status: str) -> None:
    """SESSION_ENDED / SESSION_CANCELLED unless the session is scheduled or live."""
    if status == "ended":
        raise FailedPrecondition(
            "SESSION_ENDED",
            "the session has ended",
            metadata={"sessionId": session_id, "status": "SESSION_STATUS_ENDED"},
        )
    if status == "cancelled":
        raise FailedPrecondition(
            "SESSION_CANCELLED",
            "the session was cancelled",
            metadata={"sessionId": session_id, "status": "SESSION_STATUS_CANCELLED"},
        )


def check_live(session_id: str, status: str) -> None:
    """`check_usable`, then SESSION_NOT_LIVE unless the session is live."""
    check_usable(session_id, status)
    if status != "live":
        raise FailedPrecondition(
            "SESSION_NOT_LIVE",
            "the session has not started",
            metadata={"sessionId": session_id, "status": "SESSION_STATUS_SCHEDULED"},
        )


def check_not_removed(session_id: str, participant_status: str | None) -> None:
    """PARTICIPANT_REMOVED when the caller was removed from the session."""
    if participant_status == "removed":
        raise PermissionDenied(
            "PARTICIPANT_REMOVED",
            "you were removed from this session",
            metadata={"sessionId": session_id},
        )


def check_participant(
    session_id: str, participant_status: str | None, *, admitted: bool = True
) -> None:
    """The caller is in the session (and admitted, unless `admitted=False`)."""
    check_not_removed(session_id, participant_status)
    if participant_status not in ACTIVE_STATUSES:
        raise PermissionDenied(
            "NOT_IN_SESSION",
            "you are not a participant of this session; join it first",
            metadata={"sessionId": session_id},
        )
    if admitted and participant_status == "lobby":
        raise PermissionDenied(
            "NOT_ADMITTED",
            "you are waiting in the lobby; an instructor has to admit you",
            metadata={"sessionId": session_id},
        )


# ---------------------------------------------------------------------------- queries

_SESSION_COLS = (
    "s.id, s.tenant_id, s.kind::text AS kind, s.status::text AS status, s.instructor_id, "
    "s.scheduled_start, s.scheduled_end, s.capacity, s.current_occupancy, s.settings, "
    "s.recording_enabled, s.media_router_id"
)


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return None


def _session(row: asyncpg.Record) -> SessionRef:
    settings = row["settings"]
    return SessionRef(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        kind=row["kind"],
        status=row["status"],
        instructor_id=row["instructor_id"],
        scheduled_start=row["scheduled_start"],
        scheduled_end=row["scheduled_end"],
        capacity=row["capacity"],
        current_occupancy=row["current_occupancy"],
        settings=settings if isinstance(settings, Mapping) else {},
        recording_enabled=row["recording_enabled"],
        media_router_id=row["media_router_id"],
    )


async def fetch_session(
    conn: asyncpg.Connection, tenant_id: str, session_id: str, *, for_update: bool = False
) -> SessionRef:
    """The session of the tenant (NOT_FOUND if absent, another tenant's, or soft-deleted).

    `for_update` takes the session row lock (capacity changes, event appends queue on it):
    take it before any other row lock of the session in the same transaction.
    """
    sid, tid = _uuid(session_id), _uuid(tenant_id)
    row = None
    if sid is not None and tid is not None:
        row = await conn.fetchrow(
            f"SELECT {_SESSION_COLS} FROM sessions s "
            "WHERE s.id = $1 AND s.tenant_id = $2 AND s.deleted_at IS NULL"
            + (" FOR UPDATE" if for_update else ""),
            sid,
            tid,
        )
    if row is None:
        raise NotFound("session", session_id)
    return _session(row)


async def require_live_session(
    conn: asyncpg.Connection,
    tenant_id: str,
    session_id: str,
    *,
    live: bool = False,
    for_update: bool = False,
) -> SessionRef:
    """The session, if it can still be acted in (scheduled or live; `live=True`: live)."""
    session = await fetch_session(conn, tenant_id, session_id, for_update=for_update)
    if live:
        check_live(session.id, session.status)
    else:
        check_usable(session.id, session.status)
    return session


async def _participant(
    conn: asyncpg.Connection, tenant_id: str, session_id: str, user_id: str
) -> ParticipantRef | None:
    sid, tid = _uuid(session_id), _uuid(tenant_id)
    if sid is None or tid is None:
        return None
    row = await conn.fetchrow(
        "SELECT id, session_id, user_id, display_name, role::text AS role, "
        "status::text AS status, is_guest FROM session_participants "
        "WHERE tenant_id = $1 AND session_id = $2 AND user_id = $3",
        tid,
        sid,
        user_id,
    )
    if row is None:
        return None
    return ParticipantRef(
        id=str(row["id"]),
        session_id=str(row["session_id"]),
        user_id=row["user_id"],
        display_name=row["display_name"],
        role=row["role"],
        status=row["status"],
        guest=row["is_guest"],
    )


async def require_not_removed(
    conn: asyncpg.Connection, tenant_id: str, session_id: str, user_id: str
) -> ParticipantRef | None:
    """The caller's participant row (None if they never joined); PARTICIPANT_REMOVED if removed."""
    p = await _participant(conn, tenant_id, session_id, user_id)
    check_not_removed(session_id, p.status if p else None)
    return p


async def require_participant(
    conn: asyncpg.Connection,
    tenant_id: str,
    session_id: str,
    user_id: str,
    *,
    admitted: bool = True,
) -> ParticipantRef:
    """The caller's participant row, if they are in the session (and admitted)."""
    p = await _participant(conn, tenant_id, session_id, user_id)
    check_participant(session_id, p.status if p else None, admitted=admitted)
    assert p is not None
    return p
