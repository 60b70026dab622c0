"""The session event log: append inside the caller's transaction, read `after_seq` paged.

Every state change of a session appends one event in the same transaction as its table
change. `seq` comes from `UPDATE sessions SET last_seq = last_seq + 1 ... RETURNING`,
which takes the session row lock: concurrent appenders queue on it, so per-session
sequence numbers are gap-free and ordered in commit order, and a rolled-back transaction
gives its number back (the row update rolls back with it).

`append_event` costs two statements. A hot path that already updates the session row under
its lock (the seat claim of a join) can append in that same statement instead: put
`NEXT_SEQ` in its `UPDATE sessions` and `append_event_cte()` after it in a `WITH`, read the
row back with `event_columns()` / `event_from_row()`. Same rule, same row, same lock: the
seq is the locked row's bumped `last_seq`, the tenant and session are that row's.

`type` is the name of the field of the `classmesh.events.v1.Event.payload` oneof (for
example `chat_message_posted`); `payload` is that message in protobuf JSON form.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

__all__ = [
    "NEXT_SEQ",
    "EventRecord",
    "SessionNotFoundError",
    "append_event",
    "append_event_cte",
    "event_columns",
    "event_from_row",
    "last_seq",
    "read_events",
]

#: Largest page `read_events` returns in one call.
MAX_PAGE = 1000


class SessionNotFoundError(LookupError):
    """The session an event was appended to does not exist (or belongs to another tenant)."""


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One row of `session_events`."""

    tenant_id: str
    session_id: str
    seq: int
    type: str
    payload: Mapping[str, Any]
    created_at: datetime
    actor: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    breakout_room_id: str | None = None

    def to_json(self) -> str:
        """Compact JSON used on the live bus."""
        return json.dumps(
            {
                "tenant_id": self.tenant_id,
                "session_id": self.session_id,
                "seq": self.seq,
                "type": self.type,
                "payload": self.payload,
                "created_at": self.created_at.isoformat(),
                "actor": self.actor,
                "request_id": self.request_id,
                "breakout_room_id": self.breakout_room_id,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> EventRecord:
        d = json.loads(raw)
        return cls(
            tenant_id=d["tenant_id"],
            session_id=d["session_id"],
            seq=int(d["seq"]),
            type=d["type"],
            payload=d["payload"],
            created_at=datetime.fromisoformat(d["created_at"]),
            actor=d.get("actor") or {},
            request_id=d.get("request_id"),
            breakout_room_id=d.get("breakout_room_id"),
        )


def _record(row: asyncpg.Record, prefix: str = "") -> EventRecord:
    payload = row[prefix + "payload"]
    actor = row[prefix + "actor"]
    room = row[prefix + "breakout_room_id"]
    return EventRecord(
        tenant_id=str(row[prefix + "tenant_id"]),
        session_id=str(row[prefix + "session_id"]),
        seq=int(row[prefix + "seq"]),
        type=row[prefix + "type"],
        payload=json.loads(payload) if isinstance(payload, str) else payload,
        created_at=row[prefix + "created_at"],
        actor=(json.loads(actor) if isinstance(actor, str) else actor) or {},
        request_id=row[prefix + "request_id"],
        breakout_room_id=str(room) if room else None,
    )


_COLUMNS = (
    "tenant_id",
    "session_id",
    "seq",
    "type",
    "payload",
    "actor",
    "request_id",
    "breakout_room_id",
    "created_at",
)

#: SET item of the caller's `UPDATE sessions` that takes the next seq (`append_event_cte`).
NEXT_SEQ = "last_seq = last_seq + 1"


def append_event_cte(
    locked: str,
    *,
    type: str,
    payload: str,
    actor: str,
    request_id: str = "NULL",
    breakout_room_id: str = "NULL",
    also_from: str = "",
) -> str:
    """Body of a data-modifying CTE that appends one event inside the caller's statement.

    `locked` names an earlier CTE of the same statement of the form
    `UPDATE sessions ... SET ..., {NEXT_SEQ} WHERE id = ... AND tenant_id = ... RETURNING *`
    (or at least `id, tenant_id, last_seq`): that update takes the session row lock and
    the next seq, exactly as `append_event` does, and the event gets the locked row's
    session, tenant and bumped `last_seq`. One event per statement (one bump).

    The other arguments are SQL expressions (placeholders, or expressions over `locked`
    and the relations in `also_from`, e.g. `", p"`): `payload` and `actor` jsonb objects,
    `request_id` text, `breakout_room_id` uuid. The event is inserted once per row of
    `locked` x `also_from`: when that is empty (no seat, a conflict) nothing is appended,
    but the caller's update still bumped `last_seq`; it must then undo the bump while it
    still holds the lock, or roll back. Read the row with `event_columns` and
    `event_from_row`; publish only after commit.
    """
    return (
        "INSERT INTO session_events "
        "(tenant_id, session_id, seq, type, payload, actor, request_id, breakout_room_id) "
        f"SELECT {locked}.tenant_id, {locked}.id, {locked}.last_seq, {type}, {payload}, "
        f"{actor}, {request_id}, {breakout_room_id} FROM {locked}{also_from} "
        f"RETURNING {', '.join(_COLUMNS)}"
    )


def event_columns(alias: str, prefix: str) -> str:
    """Select list reading an `append_event_cte` row as `<prefix><column>`."""
    return ", ".join(f"{alias}.{c} AS {prefix}{c}" for c in _COLUMNS)


def event_from_row(row: asyncpg.Record, prefix: str) -> EventRecord | None:
    """The event `event_columns(..., prefix)` selected; None when none was appended."""
    if row[prefix + "seq"] is None:
        return None
    return _record(row, prefix)


async def append_event(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    session_id: str,
    type: str,
    payload: Mapping[str, Any],
    actor: Mapping[str, Any] | None = None,
    request_id: str | None = None,
    breakout_room_id: str | None = None,
) -> EventRecord:
    """Append one event; must run inside the caller's transaction.

    Publish the returned record on the bus only after that transaction commits.
    """
    if not conn.is_in_transaction():
        raise RuntimeError("append_event must run inside a transaction")
    seq = await conn.fetchval(
        "UPDATE sessions SET last_seq = last_seq + 1 "
        "WHERE id = $1 AND tenant_id = $2 RETURNING last_seq",
        uuid.UUID(session_id),
        uuid.UUID(tenant_id),
    )
    if seq is None:
        raise SessionNotFoundError(session_id)
    row = await conn.fetchrow(
        "INSERT INTO session_events "
        "(tenant_id, session_id, seq, type, payload, actor, request_id, breakout_room_id) "
        "VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7, $8) "
        "RETURNING tenant_id, session_id, seq, type, payload, actor, request_id, "
        "breakout_room_id, created_at",
        uuid.UUID(tenant_id),
        uuid.UUID(session_id),
        seq,
        type,
        json.dumps(payload),
        json.dumps(dict(actor or {})),
        request_id,
        uuid.UUID(breakout_room_id) if breakout_room_id else None,
    )
    assert row is not None
    return _record(row)


async def read_events(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    tenant_id: str,
    session_id: str,
    after_seq: int = 0,
    limit: int = 500,
    types: Sequence[str] | None = None,
) -> list[EventRecord]:
    """Events with `seq > after_seq` in order, at most `limit` (capped at MAX_PAGE)."""
    limit = max(1, min(limit, MAX_PAGE))
    rows = await conn.fetch(
        "SELECT tenant_id, session_id, seq, type, payload, actor, request_id, "
        "breakout_room_id, created_at FROM session_events "
        "WHERE session_id = $1 AND tenant_id = $2 AND seq > $3 "
        "AND ($5::text[] IS NULL OR type = ANY($5::text[])) "
        "ORDER BY seq LIMIT $4",
        uuid.UUID(session_id),
        uuid.UUID(tenant_id),
        after_seq,
        limit,
        list(types) if types is not None else None,
    )
    return [_record(r) for r in rows]


async def last_seq(
    conn: asyncpg.Connection | asyncpg.Pool, *, tenant_id: str, session_id: str
) -> int:
    """The session's newest committed seq (0 when it has no events)."""
    value = await conn.fetchval(
        "SELECT last_seq FROM sessions WHERE id = $1 AND tenant_id = $2",
        uuid.UUID(session_id),
        uuid.UUID(tenant_id),
    )
    if value is None:
        raise SessionNotFoundError(session_id)
    return int(value)
