"""SQL of SessionService. Takes a Connection; the service owns the transaction.

Every query filters on `tenant_id`. Rows come back as dataclasses with database values
(enum labels as text, jsonb as dicts); the service turns them into protobuf.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from classmesh.core.audit import insert_audit
from classmesh.core.events import (
    NEXT_SEQ,
    EventRecord,
    append_event_cte,
    event_columns,
    event_from_row,
)

__all__ = [
    "AuditRow",
    "JoinClaim",
    "LogRow",
    "NewParticipant",
    "ParticipantRow",
    "SessionRow",
    "SessionStore",
    "StudyRoomRow",
]


def _u(value: str) -> uuid.UUID:
    return uuid.UUID(value)


@dataclass(frozen=True, slots=True)
class SessionRow:
    id: str
    tenant_id: str
    kind: str
    title: str
    description: str
    instructor_id: str
    scheduled_start: datetime
    scheduled_end: datetime
    status: str
    capacity: int
    current_occupancy: int
    join_link_token: str
    recording_enabled: bool
    lms_course_ref: str
    lms_lesson_ref: str
    settings: dict[str, Any]
    actual_start: datetime | None
    actual_end: datetime | None
    last_seq: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    media_router_id: str
    lobby_count: int
    #: The database's clock at the start of the transaction (`now()`): every timestamp a
    #: mutation writes comes from this one clock.
    db_now: datetime
    #: The calling user's participant status in this session (None: never joined).
    caller_status: str | None = None


@dataclass(frozen=True, slots=True)
class ParticipantRow:
    id: str
    tenant_id: str
    session_id: str
    user_id: str
    display_name: str
    role: str
    status: str
    is_guest: bool
    audio_muted: bool
    video_muted: bool
    screen_muted: bool
    permissions: dict[str, Any]
    joined_at: datetime
    admitted_at: datetime | None
    left_at: datetime | None
    last_seen_at: datetime | None
    connected_since: datetime | None
    total_connected_seconds: int
    total_connected_ms: int
    removed_reason: str
    connection_id: str
    join_count: int
    visit_started_at: datetime | None
    disconnected_at: datetime | None
    lobby_wait_ms: int
    study_session_id: str
    breakout_room_id: str
    hand_raised: bool


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: str
    tenant_id: str
    session_id: str
    actor_id: str
    actor_role: str
    action: str
    target_type: str
    target_id: str
    reason: str
    metadata: dict[str, Any]
    request_id: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class LogRow:
    id: str
    session_id: str
    room_name: str
    user_id: str
    display_name: str
    kind: str
    joined_at: datetime
    left_at: datetime
    duration_seconds: int
    detail: str
    study_session_id: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StudyRoomRow:
    session_id: str
    name: str
    capacity: int
    current_occupancy: int
    status: str
    joined: bool


_SESSION_COLS = (
    "s.id, s.tenant_id, s.kind::text AS kind, s.title, s.description, s.instructor_id, "
    "s.scheduled_start, s.scheduled_end, s.status::text AS status, s.capacity, "
    "s.current_occupancy, s.join_link_token, s.recording_enabled, s.lms_course_ref, "
    "s.lms_lesson_ref, s.settings, s.actual_start, s.actual_end, s.last_seq, s.created_at, "
    "s.updated_at, s.deleted_at, s.media_router_id, "
    "(SELECT count(*) FROM session_participants lp WHERE lp.tenant_id = s.tenant_id "
    "AND lp.session_id = s.id AND lp.status = 'lobby')::int AS lobby_count, now() AS db_now"
)

_P_COLS = (
    "p.id, p.tenant_id, p.session_id, p.user_id, p.display_name, p.role::text AS role, "
    "p.status::text AS status, p.is_guest, p.audio_muted, p.video_muted, p.screen_muted, "
    "p.permissions, p.joined_at, p.admitted_at, p.left_at, p.last_seen_at, p.connected_since, "
    "p.total_connected_seconds, p.total_connected_ms, p.removed_reason, p.connection_id, "
    "p.join_count, "
    "p.visit_started_at, p.disconnected_at, p.lobby_wait_ms, p.study_session_id, "
    "(SELECT ra.breakout_room_id FROM room_assignments ra WHERE ra.participant_id = p.id "
    "AND ra.left_at IS NULL LIMIT 1) AS breakout_room_id, "
    "EXISTS (SELECT 1 FROM hand_raises h WHERE h.session_id = p.session_id "
    "AND h.user_id = p.user_id AND h.status = 'raised') AS hand_raised"
)

#: Columns UpdateSession may set (name -> SQL cast).
SESSION_UPDATABLE = {
    "title": "",
    "description": "",
    "instructor_id": "",
    "scheduled_start": "",
    "scheduled_end": "",
    "capacity": "",
    "recording_enabled": "",
    "lms_course_ref": "",
    "lms_lesson_ref": "",
    "settings": "::jsonb",
    "status": "::session_status",
    "actual_start": "",
    "actual_end": "",
    "deleted_at": "",
    "join_link_token": "",
    "media_router_id": "",
    "current_occupancy": "",
}

#: Participant columns the service may set.
PARTICIPANT_UPDATABLE = {
    "display_name": "",
    "role": "::participant_role",
    "status": "::participant_status",
    "audio_muted": "",
    "video_muted": "",
    "screen_muted": "",
    "permissions": "::jsonb",
    "admitted_at": "",
    "left_at": "",
    "last_seen_at": "",
    "connected_since": "",
    "total_connected_seconds": "",
    "total_connected_ms": "",
    "removed_by": "",
    "removed_reason": "",
    "connection_id": "",
    "join_count": "",
    "visit_started_at": "",
    "disconnected_at": "",
    "lobby_wait_ms": "",
    "study_session_id": "",
    "email": "",
}


def _session(r: asyncpg.Record) -> SessionRow:
    keys = r.keys()
    return SessionRow(
        id=str(r["id"]),
        tenant_id=str(r["tenant_id"]),
        kind=r["kind"],
        title=r["title"],
        description=r["description"],
        instructor_id=r["instructor_id"],
        scheduled_start=r["scheduled_start"],
        scheduled_end=r["scheduled_end"],
        status=r["status"],
        capacity=r["capacity"],
        current_occupancy=r["current_occupancy"],
        join_link_token=r["join_link_token"],
        recording_enabled=r["recording_enabled"],
        lms_course_ref=r["lms_course_ref"] or "",
        lms_lesson_ref=r["lms_lesson_ref"] or "",
        settings=dict(r["settings"] or {}),
        actual_start=r["actual_start"],
        actual_end=r["actual_end"],
        last_seq=r["last_seq"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        deleted_at=r["deleted_at"],
        media_router_id=r["media_router_id"] or "",
        lobby_count=r["lobby_count"],
        db_now=r["db_now"],
        caller_status=r["caller_status"] if "caller_status" in keys else None,
    )


def _participant(r: asyncpg.Record, prefix: str = "") -> ParticipantRow:
    def f(name: str) -> Any:
        return r[prefix + name]

    return ParticipantRow(
        id=str(f("id")),
        tenant_id=str(f("tenant_id")),
        session_id=str(f("session_id")),
        user_id=f("user_id"),
        display_name=f("display_name"),
        role=f("role"),
        status=f("status"),
        is_guest=f("is_guest"),
        audio_muted=f("audio_muted"),
        video_muted=f("video_muted"),
        screen_muted=f("screen_muted"),
        permissions=dict(f("permissions") or {}),
        joined_at=f("joined_at"),
        admitted_at=f("admitted_at"),
        left_at=f("left_at"),
        last_seen_at=f("last_seen_at"),
        connected_since=f("connected_since"),
        total_connected_seconds=int(f("total_connected_seconds")),
        total_connected_ms=int(f("total_connected_ms")),
        removed_reason=f("removed_reason") or "",
        connection_id=str(f("connection_id")) if f("connection_id") else "",
        join_count=f("join_count"),
        visit_started_at=f("visit_started_at"),
        disconnected_at=f("disconnected_at"),
        lobby_wait_ms=int(f("lobby_wait_ms")),
        study_session_id=f("study_session_id") or "",
        breakout_room_id=str(f("breakout_room_id")) if f("breakout_room_id") else "",
        hand_raised=f("hand_raised"),
    )


@dataclass(frozen=True, slots=True)
class NewParticipant:
    """The columns a first join writes; every other column takes its table default."""

    id: uuid.UUID
    user_id: str
    display_name: str
    role: str
    status: str
    is_guest: bool
    audio_muted: bool
    permissions: Mapping[str, Any]
    joined_at: datetime
    connection_id: uuid.UUID
    last_seen_at: datetime
    visit_started_at: datetime
    admitted_at: datetime | None
    connected_since: datetime | None
    study_session_id: str | None
    email: str | None

    def row(self, tenant_id: str, session_id: str) -> ParticipantRow:
        """The row the insert will return, known before it runs (for the event payload).

        A new row has no room assignment (those reference the participant's id) and no
        raised hand (RaiseHand needs a participant); the rest are the defaults of
        `session_participants`. `join_seat` checks the inserted row against this.
        """
        return ParticipantRow(
            id=str(self.id),
            tenant_id=tenant_id,
            session_id=session_id,
            user_id=self.user_id,
            display_name=self.display_name,
            role=self.role,
            status=self.status,
            is_guest=self.is_guest,
            audio_muted=self.audio_muted,
            video_muted=False,
            screen_muted=False,
            permissions=dict(self.permissions),
            joined_at=self.joined_at,
            admitted_at=self.admitted_at,
            left_at=None,
            last_seen_at=self.last_seen_at,
            connected_since=self.connected_since,
            total_connected_seconds=0,
            total_connected_ms=0,
            removed_reason="",
            connection_id=str(self.connection_id),
            join_count=1,
            visit_started_at=self.visit_started_at,
            disconnected_at=None,
            lobby_wait_ms=0,
            study_session_id=self.study_session_id or "",
            breakout_room_id="",
            hand_raised=False,
        )


@dataclass(frozen=True, slots=True)
class JoinClaim:
    """What `join_seat` did: the session after the claim; the participant and event are
    None when the user's row already existed (the seat and seq are still taken)."""

    session: SessionRow
    participant: ParticipantRow | None
    event: EventRecord | None


_P_NAMES = (
    "id",
    "tenant_id",
    "session_id",
    "user_id",
    "display_name",
    "role",
    "status",
    "is_guest",
    "audio_muted",
    "video_muted",
    "screen_muted",
    "permissions",
    "joined_at",
    "admitted_at",
    "left_at",
    "last_seen_at",
    "connected_since",
    "total_connected_seconds",
    "total_connected_ms",
    "removed_reason",
    "connection_id",
    "join_count",
    "visit_started_at",
    "disconnected_at",
    "lobby_wait_ms",
    "study_session_id",
    "breakout_room_id",
    "hand_raised",
)

_UPSERT_USER_SET = (
    "ON CONFLICT (tenant_id, external_id) DO UPDATE "
    "SET display_name = EXCLUDED.display_name, role = EXCLUDED.role, updated_at = now() "
    "WHERE users.display_name IS DISTINCT FROM EXCLUDED.display_name "
    "OR users.role IS DISTINCT FROM EXCLUDED.role"
)

_CALLER_STATUS = (
    "(SELECT cp.status::text FROM session_participants cp WHERE cp.tenant_id = "
    "s.tenant_id AND cp.session_id = s.id AND cp.user_id = $3) AS caller_status"
)

_READ_FOR_JOIN = (
    "WITH u AS (INSERT INTO users (tenant_id, external_id, display_name, role) "
    "SELECT $2, $3::text, $4::text, $5::text WHERE $6::boolean AND NOT EXISTS ("
    "SELECT 1 FROM session_participants np WHERE np.tenant_id = $2 AND np.session_id = $1 "
    f"AND np.user_id = $3::text) {_UPSERT_USER_SET}) "
    f"SELECT {_SESSION_COLS}, {_CALLER_STATUS} FROM sessions s "
    "WHERE s.id = $1 AND s.tenant_id = $2 AND s.deleted_at IS NULL"
)

# The first join, in one statement under the session row lock (see `join_seat`).
_JOIN_SEAT = (
    "WITH s AS ("
    "UPDATE sessions AS s SET current_occupancy = s.current_occupancy + 1, "
    f"{NEXT_SEQ} "
    "WHERE s.id = $1 AND s.tenant_id = $2 AND s.deleted_at IS NULL "
    "AND s.current_occupancy < s.capacity "
    "AND s.status = $3::session_status AND s.kind = $4::session_kind "
    "AND s.settings = $5::jsonb AND s.scheduled_end = $6 "
    "AND ($7::text IS NULL OR s.join_link_token = $7::text) "
    "RETURNING s.*), "
    "p AS ("
    "INSERT INTO session_participants AS p (id, tenant_id, session_id, user_id, display_name, "
    "role, status, is_guest, audio_muted, permissions, joined_at, email, connection_id, "
    "last_seen_at, visit_started_at, admitted_at, connected_since, study_session_id) "
    "SELECT $8, s.tenant_id, s.id, $9, $10, $11::participant_role, $12::participant_status, "
    "$13, $14, $15::jsonb, $16, $17, $18, $19, $20, $21, $22, $23 FROM s "
    "ON CONFLICT (session_id, user_id) DO NOTHING "
    f"RETURNING {_P_COLS}), "
    "e AS ("
    + append_event_cte(
        "s",
        type="$24::text",
        payload="$25::jsonb || jsonb_build_object($26::text, s.current_occupancy)",
        actor="$27::jsonb",
        request_id="$28::text",
        also_from=", p",
    )
    + f") SELECT {_SESSION_COLS}, "
    + ", ".join(f"p.{n} AS p_{n}" for n in _P_NAMES)
    + ", "
    + event_columns("e", "e_")
    + " FROM s LEFT JOIN p ON true LEFT JOIN e ON true"
)


def _audit(r: asyncpg.Record) -> AuditRow:
    return AuditRow(
        id=str(r["id"]),
        tenant_id=str(r["tenant_id"]),
        session_id=str(r["session_id"]) if r["session_id"] else "",
        actor_id=r["actor_id"],
        actor_role=r["actor_role"] or "",
        action=r["action"],
        target_type=r["target_type"] or "",
        target_id=r["target_id"] or "",
        reason=r["reason"] or "",
        metadata=dict(r["metadata"] or {}),
        request_id=r["request_id"] or "",
        created_at=r["created_at"],
    )


def _set_clause(fields: Mapping[str, Any], allowed: Mapping[str, str], first: int) -> str:
    parts = []
    for i, name in enumerate(fields, start=first):
        if name not in allowed:
            raise KeyError(name)
        parts.append(f"{name} = ${i}{allowed[name]}")
    return ", ".join(parts)


class SessionStore:
    """Queries of the session service; every query is scoped to a tenant."""

    # ------------------------------------------------------------------ sessions

    async def insert_session(self, conn: asyncpg.Connection, **values: Any) -> SessionRow:
        cols = list(values)
        casts = {"kind": "::session_kind", "status": "::session_status", "settings": "::jsonb"}
        placeholders = ", ".join(f"${i}{casts.get(c, '')}" for i, c in enumerate(cols, 1))
        r = await conn.fetchrow(
            f"WITH s AS (INSERT INTO sessions ({', '.join(cols)}) VALUES ({placeholders}) "
            f"RETURNING *) SELECT {_SESSION_COLS} FROM s",
            *values.values(),
        )
        assert r is not None
        return _session(r)

    async def get_session(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        *,
        caller: str | None = None,
        for_update: bool = False,
        include_deleted: bool = False,
    ) -> SessionRow | None:
        caller_col = f", {_CALLER_STATUS}" if caller is not None else ""
        args: list[Any] = [_u(session_id), _u(tenant_id)]
        if caller is not None:
            args.append(caller)
        r = await conn.fetchrow(
            f"SELECT {_SESSION_COLS}{caller_col} FROM sessions s "
            "WHERE s.id = $1 AND s.tenant_id = $2"
            + ("" if include_deleted else " AND s.deleted_at IS NULL")
            + (" FOR UPDATE OF s" if for_update else ""),
            *args,
        )
        return _session(r) if r else None

    async def get_session_by_link(self, conn: asyncpg.Connection, token: str) -> SessionRow | None:
        """The session a join link names, in any tenant (the link is the credential)."""
        r = await conn.fetchrow(
            f"SELECT {_SESSION_COLS} FROM sessions s "
            "WHERE s.join_link_token = $1 AND s.deleted_at IS NULL",
            token,
        )
        return _session(r) if r else None

    async def update_session(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str, fields: Mapping[str, Any]
    ) -> SessionRow:
        sets = _set_clause(fields, SESSION_UPDATABLE, 3)
        r = await conn.fetchrow(
            f"WITH s AS (UPDATE sessions SET {sets}, updated_at = now() "
            "WHERE id = $1 AND tenant_id = $2 RETURNING *) "
            f"SELECT {_SESSION_COLS} FROM s",
            _u(session_id),
            _u(tenant_id),
            *fields.values(),
        )
        assert r is not None
        # lobby_count in a data-modifying CTE sees the snapshot before this statement, which
        # is what we want: a session update never changes participants.
        return _session(r)

    async def claim_seat(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str
    ) -> SessionRow | None:
        """Take one seat of a usable session with a free seat, locking its row.

        The capacity check and the increment are one statement under the row lock, so
        concurrent claims never exceed capacity. None: no seat was taken (the session is
        missing, over, or full); `current_occupancy` in the result includes this seat.
        """
        r = await conn.fetchrow(
            "UPDATE sessions AS s SET current_occupancy = s.current_occupancy + 1 "
            "WHERE s.id = $1 AND s.tenant_id = $2 AND s.deleted_at IS NULL "
            "AND s.status IN ('scheduled', 'live') AND s.current_occupancy < s.capacity "
            f"RETURNING {_SESSION_COLS}",
            _u(session_id),
            _u(tenant_id),
        )
        return _session(r) if r else None

    async def read_for_join(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        user_id: str,
        *,
        user: tuple[str, str] | None,
    ) -> SessionRow | None:
        """`get_session(..., caller=user_id)` without the lock, and in the same statement,
        when `user` is (display name, role) and the caller has no participant row yet,
        `upsert_user` (what a first join does before it takes a seat)."""
        name, role = user or ("", "")
        r = await conn.fetchrow(
            _READ_FOR_JOIN,
            _u(session_id),
            _u(tenant_id),
            user_id,
            name[:100],
            role,
            user is not None,
        )
        return _session(r) if r else None

    async def join_seat(
        self,
        conn: asyncpg.Connection,
        *,
        seen: SessionRow,
        link: str | None,
        participant: NewParticipant,
        event_type: str,
        payload: Mapping[str, Any],
        occupancy_key: str,
        actor: Mapping[str, Any],
        request_id: str | None,
    ) -> JoinClaim | None:
        """A first join in ONE statement under the session row lock: take a seat and the
        next seq, insert the participant, append the event (`payload` plus
        `{occupancy_key: current_occupancy}` after the seat).

        The seat is taken only if the session still has what the caller decided on when it
        read `seen` without the lock: same status, kind, settings and scheduled end (and
        join link, when `link` is given), not deleted, a free seat. None: nothing changed
        (full, or the session changed: the caller takes the step-by-step path). A
        participant of None: the user's row was inserted meanwhile (another tab); the seat
        and the seq are taken and the caller must `release_seat` before going on.
        """
        r = await conn.fetchrow(
            _JOIN_SEAT,
            _u(seen.id),
            _u(seen.tenant_id),
            seen.status,
            seen.kind,
            seen.settings,
            seen.scheduled_end,
            link,
            participant.id,
            participant.user_id,
            participant.display_name,
            participant.role,
            participant.status,
            participant.is_guest,
            participant.audio_muted,
            participant.permissions,
            participant.joined_at,
            participant.email,
            participant.connection_id,
            participant.last_seen_at,
            participant.visit_started_at,
            participant.admitted_at,
            participant.connected_since,
            participant.study_session_id,
            event_type,
            payload,
            occupancy_key,
            actor,
            request_id,
        )
        if r is None:
            return None
        joined = r["p_id"] is not None
        return JoinClaim(
            session=_session(r),
            participant=_participant(r, "p_") if joined else None,
            event=event_from_row(r, "e_"),
        )

    async def release_seat(self, conn: asyncpg.Connection, tenant_id: str, session_id: str) -> None:
        """Undo a `join_seat` that inserted nothing: give back its seat and its seq (the
        caller still holds the row lock, so nobody took a later seq)."""
        await conn.execute(
            "UPDATE sessions SET current_occupancy = current_occupancy - 1, "
            "last_seq = last_seq - 1 WHERE id = $1 AND tenant_id = $2",
            _u(session_id),
            _u(tenant_id),
        )

    async def adjust_occupancy(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str, delta: int
    ) -> int:
        """Add `delta` seats held; the caller holds the session row lock."""
        value = await conn.fetchval(
            "UPDATE sessions SET current_occupancy = current_occupancy + $3 "
            "WHERE id = $1 AND tenant_id = $2 RETURNING current_occupancy",
            _u(session_id),
            _u(tenant_id),
            delta,
        )
        assert value is not None
        return int(value)

    async def list_sessions(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        only_session: str | None,
        statuses: Sequence[str],
        kind: str | None,
        instructor_id: str,
        start_from: datetime | None,
        start_until: datetime | None,
        lms_course_ref: str,
        show_deleted: bool,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> tuple[list[SessionRow], int]:
        where = ["s.tenant_id = $1"]
        args: list[Any] = [_u(tenant_id)]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if only_session is not None:
            where.append(f"s.id = {arg(_u(only_session))}")
        if statuses:
            where.append(f"s.status::text = ANY({arg(list(statuses))}::text[])")
        if kind is not None:
            where.append(f"s.kind = {arg(kind)}::session_kind")
        if instructor_id:
            where.append(f"s.instructor_id = {arg(instructor_id)}")
        if start_from is not None:
            where.append(f"s.scheduled_start >= {arg(start_from)}")
        if start_until is not None:
            where.append(f"s.scheduled_start < {arg(start_until)}")
        if lms_course_ref:
            where.append(f"s.lms_course_ref = {arg(lms_course_ref)}")
        if not show_deleted:
            where.append("s.deleted_at IS NULL")
        cond = " AND ".join(where)
        total = await conn.fetchval(f"SELECT count(*) FROM sessions s WHERE {cond}", *args)
        if after is not None:
            cond += f" AND (s.scheduled_start, s.id) < ({arg(after[0])}, {arg(_u(after[1]))})"
        rows = await conn.fetch(
            f"SELECT {_SESSION_COLS} FROM sessions s WHERE {cond} "
            f"ORDER BY s.scheduled_start DESC, s.id DESC LIMIT {arg(limit)}",
            *args,
        )
        return [_session(r) for r in rows], int(total or 0)

    async def study_room_names(self, conn: asyncpg.Connection, tenant_id: str) -> set[str]:
        rows = await conn.fetch(
            "SELECT title FROM sessions WHERE tenant_id = $1 AND kind = 'study_room' "
            "AND deleted_at IS NULL",
            _u(tenant_id),
        )
        return {r["title"] for r in rows}

    async def tenant_exists(self, conn: asyncpg.Connection, tenant_id: str) -> bool:
        return bool(
            await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)", _u(tenant_id)
            )
        )

    # -------------------------------------------------------------- participants

    async def get_participant(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str, user_id: str
    ) -> ParticipantRow | None:
        r = await conn.fetchrow(
            f"SELECT {_P_COLS} FROM session_participants p "
            "WHERE p.tenant_id = $1 AND p.session_id = $2 AND p.user_id = $3",
            _u(tenant_id),
            _u(session_id),
            user_id,
        )
        return _participant(r) if r else None

    async def insert_participant(
        self, conn: asyncpg.Connection, *, on_conflict_skip: bool = False, **values: Any
    ) -> ParticipantRow | None:
        """Insert a participant; with `on_conflict_skip`, None when the user already has one."""
        cols = list(values)
        casts = {
            "role": "::participant_role",
            "status": "::participant_status",
            "permissions": "::jsonb",
        }
        placeholders = ", ".join(f"${i}{casts.get(c, '')}" for i, c in enumerate(cols, 1))
        r = await conn.fetchrow(
            f"INSERT INTO session_participants AS p ({', '.join(cols)}) VALUES ({placeholders}) "
            + ("ON CONFLICT (session_id, user_id) DO NOTHING " if on_conflict_skip else "")
            + f"RETURNING {_P_COLS}",
            *values.values(),
        )
        if r is None:
            assert on_conflict_skip
            return None
        return _participant(r)

    async def update_participant(
        self, conn: asyncpg.Connection, participant: ParticipantRow, fields: Mapping[str, Any]
    ) -> ParticipantRow:
        sets = _set_clause(fields, PARTICIPANT_UPDATABLE, 3)
        r = await conn.fetchrow(
            f"UPDATE session_participants AS p SET {sets}, updated_at = now() "
            f"WHERE p.tenant_id = $1 AND p.id = $2 RETURNING {_P_COLS}",
            _u(participant.tenant_id),
            _u(participant.id),
            *fields.values(),
        )
        assert r is not None
        return _participant(r)

    async def participants_by_status(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        statuses: Sequence[str],
        *,
        user_ids: Sequence[str] | None = None,
    ) -> list[ParticipantRow]:
        """Participants in one of `statuses`, in join order (optionally only `user_ids`)."""
        rows = await conn.fetch(
            f"SELECT {_P_COLS} FROM session_participants p WHERE p.tenant_id = $1 "
            "AND p.session_id = $2 AND p.status::text = ANY($3::text[]) "
            "AND ($4::text[] IS NULL OR p.user_id = ANY($4::text[])) "
            "ORDER BY p.visit_started_at NULLS FIRST, p.joined_at, p.id",
            _u(tenant_id),
            _u(session_id),
            list(statuses),
            list(user_ids) if user_ids is not None else None,
        )
        return [_participant(r) for r in rows]

    async def count_active_role(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        role: str,
        *,
        excluding_user: str,
    ) -> int:
        value = await conn.fetchval(
            "SELECT count(*) FROM session_participants WHERE tenant_id = $1 AND session_id = $2 "
            "AND role::text = $3 AND status IN ('lobby', 'admitted', 'disconnected') "
            "AND user_id <> $4",
            _u(tenant_id),
            _u(session_id),
            role,
            excluding_user,
        )
        return int(value or 0)

    async def list_participants(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        statuses: Sequence[str],
        roles: Sequence[str],
        breakout_room_id: str | None,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> tuple[list[ParticipantRow], int]:
        where = ["p.tenant_id = $1", "p.session_id = $2"]
        args: list[Any] = [_u(tenant_id), _u(session_id)]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if statuses:
            where.append(f"p.status::text = ANY({arg(list(statuses))}::text[])")
        if roles:
            where.append(f"p.role::text = ANY({arg(list(roles))}::text[])")
        if breakout_room_id is not None:
            where.append(
                "EXISTS (SELECT 1 FROM room_assignments ra WHERE ra.participant_id = p.id "
                f"AND ra.left_at IS NULL AND ra.breakout_room_id = {arg(_u(breakout_room_id))})"
            )
        cond = " AND ".join(where)
        total = await conn.fetchval(
            f"SELECT count(*) FROM session_participants p WHERE {cond}", *args
        )
        if after is not None:
            cond += f" AND (p.joined_at, p.id) > ({arg(after[0])}, {arg(_u(after[1]))})"
        rows = await conn.fetch(
            f"SELECT {_P_COLS} FROM session_participants p WHERE {cond} "
            f"ORDER BY p.joined_at, p.id LIMIT {arg(limit)}",
            *args,
        )
        return [_participant(r) for r in rows], int(total or 0)

    async def touch_presence(
        self, conn: asyncpg.Connection, participant_ids: Sequence[str], min_age: float
    ) -> int:
        """last_seen_at = now() for present participants not touched in `min_age` seconds."""
        result = await conn.execute(
            "UPDATE session_participants SET last_seen_at = now() "
            "WHERE id = ANY($1::uuid[]) AND status IN ('lobby', 'admitted') "
            "AND (last_seen_at IS NULL OR last_seen_at < now() - make_interval(secs => $2))",
            [_u(p) for p in participant_ids],
            min_age,
        )
        return int(result.split()[-1]) if result else 0

    async def heartbeat(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        user_id: str,
        min_age: float,
    ) -> asyncpg.Record | None:
        """One round trip: touch presence (at most once per `min_age` s) and read the state."""
        return await conn.fetchrow(
            "WITH p AS (SELECT sp.id, sp.status::text AS status, sp.last_seen_at "
            "FROM session_participants sp WHERE sp.tenant_id = $1 AND sp.session_id = $2 "
            "AND sp.user_id = $3), "
            "u AS (UPDATE session_participants SET last_seen_at = now() "
            "WHERE id = (SELECT id FROM p) AND status IN ('lobby', 'admitted') "
            "AND (last_seen_at IS NULL OR last_seen_at < now() - make_interval(secs => $4)) "
            "RETURNING last_seen_at) "
            "SELECT s.status::text AS session_status, s.last_seq, s.deleted_at, "
            "p.id AS participant_id, p.status AS status, p.last_seen_at AS seen_before, "
            "(SELECT last_seen_at FROM u) AS touched_at, now() AS db_now "
            "FROM sessions s LEFT JOIN p ON true WHERE s.id = $2 AND s.tenant_id = $1",
            _u(tenant_id),
            _u(session_id),
            user_id,
            min_age,
        )

    async def stale_sessions(
        self, conn: asyncpg.Connection, timeout: float, grace: float, limit: int
    ) -> list[tuple[str, str]]:
        """(tenant_id, session_id) of sessions with overdue presence or expired grace."""
        rows = await conn.fetch(
            "SELECT DISTINCT tenant_id, session_id FROM ("
            "(SELECT tenant_id, session_id FROM session_participants "
            "WHERE status IN ('lobby', 'admitted') "
            "AND last_seen_at < now() - make_interval(secs => $1) LIMIT $3) UNION ALL "
            "(SELECT tenant_id, session_id FROM session_participants "
            "WHERE status = 'disconnected' "
            "AND disconnected_at < now() - make_interval(secs => $2) LIMIT $3)) x",
            timeout,
            grace,
            limit,
        )
        return [(str(r["tenant_id"]), str(r["session_id"])) for r in rows]

    async def lock_session_nowait(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str
    ) -> str | None:
        """Lock the session row unless someone else holds it; returns its status or None."""
        value = await conn.fetchval(
            "SELECT status::text FROM sessions WHERE id = $1 AND tenant_id = $2 "
            "FOR UPDATE SKIP LOCKED",
            _u(session_id),
            _u(tenant_id),
        )
        return str(value) if value is not None else None

    async def overdue_participants(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        timeout: float,
        grace: float,
    ) -> list[ParticipantRow]:
        """Participants to disconnect or to let go, locked (other sweepers skip them)."""
        rows = await conn.fetch(
            f"SELECT {_P_COLS} FROM session_participants p WHERE p.tenant_id = $1 "
            "AND p.session_id = $2 AND ("
            "(p.status IN ('lobby', 'admitted') "
            "AND p.last_seen_at < now() - make_interval(secs => $3)) OR "
            "(p.status = 'disconnected' AND p.disconnected_at < now() - make_interval(secs => $4)))"
            " ORDER BY p.joined_at, p.id FOR UPDATE OF p SKIP LOCKED",
            _u(tenant_id),
            _u(session_id),
            timeout,
            grace,
        )
        return [_participant(r) for r in rows]

    async def upsert_user(
        self, conn: asyncpg.Connection, tenant_id: str, user_id: str, name: str, role: str
    ) -> None:
        await conn.execute(
            "INSERT INTO users (tenant_id, external_id, display_name, role) "
            f"VALUES ($1, $2, $3, $4) {_UPSERT_USER_SET}",
            _u(tenant_id),
            user_id,
            name[:100],
            role,
        )

    # ------------------------------------------------------------------ logs

    async def insert_log(
        self,
        conn: asyncpg.Connection,
        *,
        participant: ParticipantRow,
        joined_at: datetime,
        left_at: datetime,
        reason: str,
    ) -> None:
        left_at = max(left_at, joined_at)
        duration = int(round((left_at - joined_at).total_seconds()))
        await conn.execute(
            "INSERT INTO session_logs (tenant_id, session_id, participant_id, breakout_room_id, "
            "user_id, joined_at, left_at, duration_seconds, reason, kind, display_name, detail, "
            "study_session_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::leave_reason, "
            "'visit', $10, $9, $11)",
            _u(participant.tenant_id),
            _u(participant.session_id),
            _u(participant.id),
            _u(participant.breakout_room_id) if participant.breakout_room_id else None,
            participant.user_id,
            joined_at,
            left_at,
            max(0, duration),
            reason,
            participant.display_name[:100],
            participant.study_session_id or None,
        )

    async def list_logs(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str | None,
        user_id: str,
        created_from: datetime | None,
        created_until: datetime | None,
        kind: str | None,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> tuple[list[LogRow], int, int]:
        """Study-room log rows newest first; also (total matches, total VISIT seconds)."""
        where = ["l.tenant_id = $1", "s.kind = 'study_room'"]
        args: list[Any] = [_u(tenant_id)]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if session_id is not None:
            where.append(f"l.session_id = {arg(_u(session_id))}")
        if user_id:
            where.append(f"l.user_id = {arg(user_id)}")
        if created_from is not None:
            where.append(f"l.created_at >= {arg(created_from)}")
        if created_until is not None:
            where.append(f"l.created_at < {arg(created_until)}")
        if kind is not None:
            where.append(f"l.kind = {arg(kind)}")
        cond = " AND ".join(where)
        base = (
            "FROM session_logs l JOIN sessions s "
            "ON s.tenant_id = l.tenant_id AND s.id = l.session_id"
        )
        agg = await conn.fetchrow(
            "SELECT count(*) AS n, coalesce(sum(l.duration_seconds) FILTER "
            f"(WHERE l.kind = 'visit'), 0) AS secs {base} WHERE {cond}",
            *args,
        )
        if after is not None:
            cond += f" AND (l.created_at, l.id) < ({arg(after[0])}, {arg(_u(after[1]))})"
        rows = await conn.fetch(
            "SELECT l.id, l.session_id, s.title AS room_name, l.user_id, l.display_name, "
            "l.kind, l.joined_at, l.left_at, l.duration_seconds, l.detail, l.study_session_id, "
            f"l.created_at {base} WHERE {cond} "
            f"ORDER BY l.created_at DESC, l.id DESC LIMIT {arg(limit)}",
            *args,
        )
        out = [
            LogRow(
                id=str(r["id"]),
                session_id=str(r["session_id"]),
                room_name=r["room_name"],
                user_id=r["user_id"],
                display_name=r["display_name"],
                kind=r["kind"],
                joined_at=r["joined_at"],
                left_at=r["left_at"],
                duration_seconds=r["duration_seconds"],
                detail=r["detail"],
                study_session_id=r["study_session_id"] or "",
                created_at=r["created_at"],
            )
            for r in rows
        ]
        assert agg is not None
        return out, int(agg["n"]), int(agg["secs"])

    async def list_study_rooms(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        only_session: str | None,
        caller: str,
        only_available: bool,
        after: tuple[str, str] | None,
        limit: int,
    ) -> tuple[list[StudyRoomRow], int]:
        where = ["s.tenant_id = $1", "s.kind = 'study_room'", "s.deleted_at IS NULL"]
        args: list[Any] = [_u(tenant_id), caller]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if only_session is not None:
            where.append(f"s.id = {arg(_u(only_session))}")
        if only_available:
            where.append("s.current_occupancy < s.capacity AND s.status IN ('scheduled', 'live')")
        cond = " AND ".join(where)
        total = await conn.fetchval(
            f"SELECT count(*) FROM sessions s WHERE {cond} AND $2::text IS NOT NULL", *args
        )
        if after is not None:
            cond += f" AND (s.title, s.id) > ({arg(after[0])}, {arg(_u(after[1]))})"
        rows = await conn.fetch(
            "SELECT s.id, s.title, s.capacity, s.current_occupancy, s.status::text AS status, "
            "EXISTS (SELECT 1 FROM session_participants p WHERE p.tenant_id = s.tenant_id "
            "AND p.session_id = s.id AND p.user_id = $2 "
            "AND p.status IN ('lobby', 'admitted', 'disconnected')) AS joined "
            f"FROM sessions s WHERE {cond} ORDER BY s.title, s.id LIMIT {arg(limit)}",
            *args,
        )
        return [
            StudyRoomRow(
                session_id=str(r["id"]),
                name=r["title"],
                capacity=r["capacity"],
                current_occupancy=r["current_occupancy"],
                status=r["status"],
                joined=r["joined"],
            )
            for r in rows
        ], int(total or 0)

    # ------------------------------------------------------------------ audit

    #: Audit rows go through the one shared insert.
    insert_audit = staticmethod(insert_audit)

    async def list_audit(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str | None,
        actions: Sequence[str],
        actor_id: str,
        created_from: datetime | None,
        created_until: datetime | None,
        after: tuple[datetime, str] | None,
        limit: int,
        target_user_id: str = "",
    ) -> list[AuditRow]:
        where = ["tenant_id = $1"]
        args: list[Any] = [_u(tenant_id)]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        # None: the whole tenant (AdminService.ListAuditLogs), tenant-level entries included.
        if session_id is not None:
            where.append(f"session_id = {arg(_u(session_id))}")
        if actions:
            where.append(f"action = ANY({arg(list(actions))}::text[])")
        if actor_id:
            where.append(f"actor_id = {arg(actor_id)}")
        if target_user_id:
            where.append(f"target_type = 'user' AND target_id = {arg(target_user_id)}")
        if created_from is not None:
            where.append(f"created_at >= {arg(created_from)}")
        if created_until is not None:
            where.append(f"created_at < {arg(created_until)}")
        if after is not None:
            where.append(f"(created_at, id) < ({arg(after[0])}, {arg(_u(after[1]))})")
        rows = await conn.fetch(
            f"SELECT * FROM audit_logs WHERE {' AND '.join(where)} "
            f"ORDER BY created_at DESC, id DESC LIMIT {arg(limit)}",
            *args,
        )
        return [_audit(r) for r in rows]

    # ------------------------------------------------------------------ guests

    async def guest_signing_key(
        self, conn: asyncpg.Connection, tenant_id: str, description: str
    ) -> tuple[str, str]:
        """(key id, secret) of the tenant's guest-token key, created on first use."""
        row = await conn.fetchrow(
            "SELECT id, secret FROM api_keys WHERE tenant_id = $1 AND description = $2 "
            "AND revoked_at IS NULL ORDER BY created_at LIMIT 1",
            _u(tenant_id),
            description,
        )
        if row is not None:
            return row["id"], row["secret"]
        # Serialise creators per tenant, then look again.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('classmesh.guest_key:' || $1::text))",
            tenant_id,
        )
        row = await conn.fetchrow(
            "SELECT id, secret FROM api_keys WHERE tenant_id = $1 AND description = $2 "
            "AND revoked_at IS NULL ORDER BY created_at LIMIT 1",
            _u(tenant_id),
            description,
        )
        if row is not None:
            return row["id"], row["secret"]
        key_id, secret = "ck_" + secrets.token_hex(10), secrets.token_urlsafe(32)
        await conn.execute(
            "INSERT INTO api_keys (id, tenant_id, secret, role, description) "
            "VALUES ($1, $2, $3, 'guest', $4)",
            key_id,
            _u(tenant_id),
            secret,
            description,
        )
        return key_id, secret

    async def insert_guest_token(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        token: str,
        display_name: str,
        created_by: str,
        expires_at: datetime,
    ) -> None:
        await conn.execute(
            "INSERT INTO guest_tokens (tenant_id, session_id, token_hash, display_name, "
            "created_by, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
            _u(tenant_id),
            _u(session_id),
            hashlib.sha256(token.encode()).digest(),
            display_name,
            created_by,
            expires_at,
        )

    # ------------------------------------------------------------------ analytics

    async def interaction_counts(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str
    ) -> dict[str, int]:
        """Engagement counters from InteractionService's tables (zero until it writes them)."""
        r = await conn.fetchrow(
            "SELECT "
            "(SELECT count(*) FROM chat_messages WHERE tenant_id = $1 AND session_id = $2) AS chat,"
            "(SELECT count(*) FROM questions WHERE tenant_id = $1 AND session_id = $2) AS asked,"
            "(SELECT count(*) FROM questions WHERE tenant_id = $1 AND session_id = $2 "
            " AND answered) AS answered,"
            "(SELECT count(*) FROM question_votes v JOIN questions q ON q.tenant_id = v.tenant_id "
            " AND q.id = v.question_id WHERE q.tenant_id = $1 AND q.session_id = $2) AS votes,"
            "(SELECT count(*) FROM session_polls WHERE tenant_id = $1 "
            " AND session_id = $2) AS polls,"
            "(SELECT count(*) FROM poll_responses r JOIN session_polls sp "
            " ON sp.tenant_id = r.tenant_id AND sp.id = r.poll_id "
            " WHERE sp.tenant_id = $1 AND sp.session_id = $2) AS responses,"
            "(SELECT count(*) FROM hand_raises WHERE tenant_id = $1 AND session_id = $2) AS hands,"
            "(SELECT count(DISTINCT u) FROM ("
            " SELECT user_id AS u FROM chat_messages WHERE tenant_id = $1 AND session_id = $2"
            " UNION SELECT user_id FROM questions WHERE tenant_id = $1 AND session_id = $2"
            " UNION SELECT v.user_id FROM question_votes v JOIN questions q"
            "  ON q.tenant_id = v.tenant_id AND q.id = v.question_id"
            "  WHERE q.tenant_id = $1 AND q.session_id = $2"
            " UNION SELECT r.user_id FROM poll_responses r JOIN session_polls sp"
            "  ON sp.tenant_id = r.tenant_id AND sp.id = r.poll_id"
            "  WHERE sp.tenant_id = $1 AND sp.session_id = $2"
            " UNION SELECT user_id FROM hand_raises WHERE tenant_id = $1 AND session_id = $2"
            ") e) AS engaged",
            _u(tenant_id),
            _u(session_id),
        )
        assert r is not None
        return {k: int(r[k]) for k in r.keys()}

    async def interaction_times(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str, since: datetime
    ) -> dict[str, list[datetime]]:
        """Timestamps of engagement actions since `since`, for the analytics timeline."""
        out: dict[str, list[datetime]] = {}
        queries = {
            "chat_messages": "SELECT sent_at AS t FROM chat_messages "
            "WHERE tenant_id = $1 AND session_id = $2 AND sent_at >= $3",
            "questions": "SELECT created_at AS t FROM questions "
            "WHERE tenant_id = $1 AND session_id = $2 AND created_at >= $3",
            "question_votes": "SELECT v.created_at AS t FROM question_votes v JOIN questions q "
            "ON q.tenant_id = v.tenant_id AND q.id = v.question_id "
            "WHERE q.tenant_id = $1 AND q.session_id = $2 AND v.created_at >= $3",
            "poll_responses": "SELECT r.responded_at AS t FROM poll_responses r "
            "JOIN session_polls sp ON sp.tenant_id = r.tenant_id AND sp.id = r.poll_id "
            "WHERE sp.tenant_id = $1 AND sp.session_id = $2 AND r.responded_at >= $3",
            "hand_raises": "SELECT raised_at AS t FROM hand_raises "
            "WHERE tenant_id = $1 AND session_id = $2 AND raised_at >= $3",
        }
        for name, sql in queries.items():
            rows = await conn.fetch(sql, _u(tenant_id), _u(session_id), since)
            out[name] = [r["t"] for r in rows]
        return out

    async def attendance(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        only_user: str | None,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> tuple[list[ParticipantRow], int]:
        where = "p.tenant_id = $1 AND p.session_id = $2 AND ($3::text IS NULL OR p.user_id = $3)"
        args: list[Any] = [_u(tenant_id), _u(session_id), only_user]
        total = await conn.fetchval(
            f"SELECT count(*) FROM session_participants p WHERE {where}", *args
        )
        if after is not None:
            where += " AND (p.joined_at, p.id) > ($4, $5)"
            args += [after[0], _u(after[1])]
        rows = await conn.fetch(
            f"SELECT {_P_COLS} FROM session_participants p WHERE {where} "
            f"ORDER BY p.joined_at, p.id LIMIT ${len(args) + 1}",
            *args,
            limit,
        )
        return [_participant(r) for r in rows], int(total or 0)
