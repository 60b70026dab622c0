"""SQL of BreakoutService: breakout rooms, room assignments, the participants they hold.

A participant's current room is their assignment with `left_at IS NULL` in an open room
(the same rule InteractionService's and SessionService's stores read); closing a room sets
`left_at` on every assignment of it, so a closed room never holds anyone. A participant
re-assigned to a room they had left gets their old row back (`room_assignments` keeps one
row per room and participant).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

__all__ = [
    "ACTIVE",
    "AssignmentRow",
    "BreakoutStore",
    "MemberRow",
    "RoomRow",
    "SERVICE_KEY_DESCRIPTION",
]

#: Participant statuses that are still in the session (the room counts them).
ACTIVE = ("lobby", "admitted", "disconnected")
#: Description of the tenant API key that signs the breakout service's own media calls.
SERVICE_KEY_DESCRIPTION = "classmesh breakout service"


def _u(value: str) -> uuid.UUID:
    return uuid.UUID(value)


@dataclass(frozen=True, slots=True)
class RoomRow:
    id: str
    tenant_id: str
    session_id: str
    name: str
    capacity: int
    time_limit_minutes: int | None
    status: str
    opened_at: datetime
    closes_at: datetime | None
    closed_at: datetime | None
    close_reason: str | None
    router_id: str | None
    count: int


@dataclass(frozen=True, slots=True)
class AssignmentRow:
    breakout_room_id: str
    participant_id: str
    user_id: str
    display_name: str
    role: str
    assigned_at: datetime
    joined_at: datetime | None
    left_at: datetime | None


@dataclass(frozen=True, slots=True)
class MemberRow:
    """A participant of the session with the room they are in now (None = main room)."""

    id: str
    user_id: str
    display_name: str
    role: str
    status: str
    can_manage_breakouts: bool
    room_id: str | None
    joined_at: datetime


#: The seats a room's capacity limits: current assignments of participants still in the
#: session, except a moderator's own visit (JoinBreakoutRoom by an instructor or assistant
#: into a room nobody assigned them to), which never takes a learner's place.
_ROOM_COLS = (
    "b.id, b.tenant_id, b.session_id, b.name, b.capacity, b.time_limit_minutes, "
    "b.status::text AS status, b.opened_at, b.closes_at, b.closed_at, b.close_reason, "
    "b.router_id, (SELECT count(*) FROM room_assignments ra JOIN session_participants p "
    "ON p.id = ra.participant_id WHERE ra.breakout_room_id = b.id AND ra.left_at IS NULL "
    "AND p.status::text = ANY('{lobby,admitted,disconnected}'::text[]) "
    "AND NOT (p.role::text IN ('instructor', 'assistant') "
    "AND ra.assigned_by IS NOT DISTINCT FROM p.user_id)) AS count"
)
_ORDER = "ORDER BY b.created_at, b.position, b.id"
#: When an assignment ends. `now()` is the transaction's start: a transaction that began
#: before another one (committed first, under the session row lock) assigned the
#: participant would otherwise end the assignment before it began.
_LEFT_AT = "greatest(now(), ra.assigned_at)"


def _room(r: asyncpg.Record) -> RoomRow:
    return RoomRow(
        id=str(r["id"]),
        tenant_id=str(r["tenant_id"]),
        session_id=str(r["session_id"]),
        name=r["name"],
        capacity=r["capacity"],
        time_limit_minutes=r["time_limit_minutes"],
        status=r["status"],
        opened_at=r["opened_at"],
        closes_at=r["closes_at"],
        closed_at=r["closed_at"],
        close_reason=r["close_reason"],
        router_id=r["router_id"],
        count=int(r["count"]),
    )


def _member(r: asyncpg.Record) -> MemberRow:
    perms = r["permissions"] or {}
    return MemberRow(
        id=str(r["id"]),
        user_id=r["user_id"],
        display_name=r["display_name"],
        role=r["role"],
        status=r["status"],
        can_manage_breakouts=bool(perms.get("can_manage_breakouts", False)),
        room_id=str(r["room_id"]) if r["room_id"] else None,
        joined_at=r["joined_at"],
    )


_MEMBER_COLS = (
    "p.id, p.user_id, p.display_name, p.role::text AS role, p.status::text AS status, "
    "p.permissions, p.joined_at, "
    "(SELECT ra.breakout_room_id FROM room_assignments ra JOIN breakout_rooms b "
    "ON b.id = ra.breakout_room_id AND b.status = 'open' "
    "WHERE ra.participant_id = p.id AND ra.left_at IS NULL LIMIT 1) AS room_id"
)


class BreakoutStore:
    """Every statement runs on the caller's connection (and transaction)."""

    # ------------------------------------------------------------------ rooms

    async def get_room(
        self, conn: asyncpg.Connection, tenant_id: str, room_id: str, *, for_update: bool = False
    ) -> RoomRow | None:
        row = await conn.fetchrow(
            f"SELECT {_ROOM_COLS} FROM breakout_rooms b WHERE b.id = $1 AND b.tenant_id = $2"
            + (" FOR UPDATE OF b" if for_update else ""),
            _u(room_id),
            _u(tenant_id),
        )
        return _room(row) if row else None

    async def rooms(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        *,
        open_only: bool = True,
        ids: Sequence[str] | None = None,
        after: tuple[datetime, int, str] | None = None,
        limit: int | None = None,
    ) -> list[RoomRow]:
        args: list[Any] = [_u(tenant_id), _u(session_id)]
        where = "b.tenant_id = $1 AND b.session_id = $2"
        if open_only:
            where += " AND b.status = 'open'"
        if ids is not None:
            args.append([_u(i) for i in ids])
            where += f" AND b.id = ANY(${len(args)}::uuid[])"
        if after is not None:
            args.extend([after[0], after[1], _u(after[2])])
            n = len(args)
            where += f" AND (b.created_at, b.position, b.id) > (${n - 2}, ${n - 1}, ${n})"
        sql = f"SELECT {_ROOM_COLS} FROM breakout_rooms b WHERE {where} {_ORDER}"
        if limit is not None:
            args.append(limit)
            sql += f" LIMIT ${len(args)}"
        return [_room(r) for r in await conn.fetch(sql, *args)]

    async def room_cursor(self, conn: asyncpg.Connection, room_id: str) -> tuple[datetime, int]:
        row = await conn.fetchrow(
            "SELECT created_at, position FROM breakout_rooms WHERE id = $1", _u(room_id)
        )
        assert row is not None
        return row["created_at"], row["position"]

    async def count_rooms(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str, *, open_only: bool
    ) -> int:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM breakout_rooms WHERE tenant_id = $1 AND session_id = $2"
                + (" AND status = 'open'" if open_only else ""),
                _u(tenant_id),
                _u(session_id),
            )
        )

    async def insert_room(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        name: str,
        capacity: int,
        time_limit_minutes: int | None,
        position: int,
        created_by: str,
    ) -> str:
        rid = await conn.fetchval(
            "INSERT INTO breakout_rooms (tenant_id, session_id, name, capacity, "
            "time_limit_minutes, closes_at, position, created_by) "
            "VALUES ($1, $2, $3, $4, $5::int, "
            "CASE WHEN $5::int IS NULL THEN NULL ELSE now() + make_interval(mins => $5::int) END, "
            "$6, $7) RETURNING id",
            _u(tenant_id),
            _u(session_id),
            name,
            capacity,
            time_limit_minutes,
            position,
            created_by[:255],
        )
        return str(rid)

    async def extend_room(self, conn: asyncpg.Connection, room_id: str, minutes: int) -> None:
        await conn.execute(
            "UPDATE breakout_rooms SET time_limit_minutes = time_limit_minutes + $2, "
            "closes_at = closes_at + make_interval(mins => $2), updated_at = now() "
            "WHERE id = $1",
            _u(room_id),
            minutes,
        )

    async def close_room(self, conn: asyncpg.Connection, room_id: str, reason: str) -> list[str]:
        """Close the room; everyone in it returns to the main room. Returns their user ids."""
        returned = await conn.fetch(
            f"UPDATE room_assignments ra SET left_at = {_LEFT_AT} FROM session_participants p "
            "WHERE ra.breakout_room_id = $1 AND ra.left_at IS NULL AND p.id = ra.participant_id "
            "RETURNING p.user_id, p.status::text AS status",
            _u(room_id),
        )
        await conn.execute(
            "UPDATE breakout_rooms SET status = 'closed', closed_at = now(), close_reason = $2, "
            "updated_at = now() WHERE id = $1",
            _u(room_id),
            reason,
        )
        return sorted(r["user_id"] for r in returned if r["status"] in ACTIVE)

    async def set_router(self, conn: asyncpg.Connection, room_id: str, router_id: str) -> None:
        await conn.execute(
            "UPDATE breakout_rooms SET router_id = $2 WHERE id = $1 AND router_id IS NULL",
            _u(room_id),
            router_id,
        )

    # ------------------------------------------------------------------ assignments

    async def assignments(
        self, conn: asyncpg.Connection, room_ids: Sequence[str]
    ) -> list[AssignmentRow]:
        """Current assignments (left_at IS NULL) of participants still in the session."""
        rows = await conn.fetch(
            "SELECT ra.breakout_room_id, ra.participant_id, p.user_id, p.display_name, "
            "p.role::text AS role, ra.assigned_at, ra.joined_at, ra.left_at "
            "FROM room_assignments ra JOIN session_participants p ON p.id = ra.participant_id "
            "WHERE ra.breakout_room_id = ANY($1::uuid[]) AND ra.left_at IS NULL "
            "AND p.status::text = ANY('{lobby,admitted,disconnected}'::text[]) "
            "ORDER BY ra.assigned_at, p.user_id",
            [_u(r) for r in room_ids],
        )
        return [
            AssignmentRow(
                breakout_room_id=str(r["breakout_room_id"]),
                participant_id=str(r["participant_id"]),
                user_id=r["user_id"],
                display_name=r["display_name"],
                role=r["role"],
                assigned_at=r["assigned_at"],
                joined_at=r["joined_at"],
                left_at=r["left_at"],
            )
            for r in rows
        ]

    async def leave_current(self, conn: asyncpg.Connection, participant_id: str) -> None:
        await conn.execute(
            f"UPDATE room_assignments ra SET left_at = {_LEFT_AT} "
            "WHERE participant_id = $1 AND left_at IS NULL",
            _u(participant_id),
        )

    async def assign(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        room_id: str,
        participant_id: str,
        assigned_by: str,
        joined: bool,
    ) -> None:
        """Put the participant in the room (leaving any other first)."""
        await self.leave_current(conn, participant_id)
        await conn.execute(
            "INSERT INTO room_assignments (tenant_id, session_id, breakout_room_id, "
            "participant_id, assigned_by, joined_at) "
            "VALUES ($1, $2, $3, $4, $5, CASE WHEN $6::bool THEN now() END) "
            "ON CONFLICT (breakout_room_id, participant_id) DO UPDATE SET left_at = NULL, "
            "assigned_at = now(), assigned_by = EXCLUDED.assigned_by, "
            "joined_at = EXCLUDED.joined_at",
            _u(tenant_id),
            _u(session_id),
            _u(room_id),
            _u(participant_id),
            assigned_by[:255],
            joined,
        )

    async def mark_joined(
        self, conn: asyncpg.Connection, room_id: str, participant_id: str
    ) -> None:
        await conn.execute(
            "UPDATE room_assignments SET joined_at = now() WHERE breakout_room_id = $1 "
            "AND participant_id = $2 AND left_at IS NULL AND joined_at IS NULL",
            _u(room_id),
            _u(participant_id),
        )

    async def joined_at(
        self, conn: asyncpg.Connection, room_id: str, participant_id: str
    ) -> datetime | None:
        value: datetime | None = await conn.fetchval(
            "SELECT joined_at FROM room_assignments WHERE breakout_room_id = $1 "
            "AND participant_id = $2 AND left_at IS NULL",
            _u(room_id),
            _u(participant_id),
        )
        return value

    # ------------------------------------------------------------------ participants

    async def members(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        *,
        user_ids: Sequence[str] | None = None,
    ) -> list[MemberRow]:
        """Participants of the session (all, or those with these user ids), in join order."""
        args: list[Any] = [_u(tenant_id), _u(session_id)]
        where = "p.tenant_id = $1 AND p.session_id = $2"
        if user_ids is not None:
            args.append(list(user_ids))
            where += " AND p.user_id = ANY($3::text[])"
        rows = await conn.fetch(
            f"SELECT {_MEMBER_COLS} FROM session_participants p WHERE {where} "
            "ORDER BY p.joined_at, p.id",
            *args,
        )
        return [_member(r) for r in rows]

    async def member(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str, user_id: str
    ) -> MemberRow | None:
        found = await self.members(conn, tenant_id, session_id, user_ids=[user_id])
        return found[0] if found else None

    # ------------------------------------------------------------------ sweeper

    async def due_sessions(self, conn: asyncpg.Connection, limit: int) -> list[tuple[str, str]]:
        """(tenant, session) pairs with an open room whose time is up, or whose session is
        no longer live."""
        rows = await conn.fetch(
            "SELECT DISTINCT b.tenant_id, b.session_id FROM breakout_rooms b "
            "JOIN sessions s ON s.id = b.session_id "
            "WHERE b.status = 'open' AND (b.closes_at <= now() OR s.status <> 'live' "
            "OR s.deleted_at IS NOT NULL) LIMIT $1",
            limit,
        )
        return [(str(r["tenant_id"]), str(r["session_id"])) for r in rows]

    async def lock_session_nowait(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str
    ) -> str | None:
        """The session's status (row locked), or None when another transaction holds it."""
        row = await conn.fetchrow(
            "SELECT status::text AS status, deleted_at FROM sessions "
            "WHERE id = $1 AND tenant_id = $2 FOR UPDATE SKIP LOCKED",
            _u(session_id),
            _u(tenant_id),
        )
        if row is None:
            return None
        return "deleted" if row["deleted_at"] is not None else str(row["status"])

    # ------------------------------------------------------------------ service key

    async def signing_key(self, conn: asyncpg.Connection, tenant_id: str) -> tuple[str, str]:
        """(key id, secret) of the tenant's breakout-service key, created on first use."""
        sql = (
            "SELECT id, secret FROM api_keys WHERE tenant_id = $1 AND description = $2 "
            "AND revoked_at IS NULL ORDER BY created_at LIMIT 1"
        )
        row = await conn.fetchrow(sql, _u(tenant_id), SERVICE_KEY_DESCRIPTION)
        if row is not None:
            return row["id"], row["secret"]
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('classmesh.breakout_key:' || $1::text))",
            tenant_id,
        )
        row = await conn.fetchrow(sql, _u(tenant_id), SERVICE_KEY_DESCRIPTION)
        if row is not None:
            return row["id"], row["secret"]
        key_id, secret = "ck_" + secrets.token_hex(10), secrets.token_urlsafe(32)
        await conn.execute(
            "INSERT INTO api_keys (id, tenant_id, secret, role, description) "
            "VALUES ($1, $2, $3, 'admin', $4)",
            key_id,
            _u(tenant_id),
            secret,
            SERVICE_KEY_DESCRIPTION,
        )
        return key_id, secret
