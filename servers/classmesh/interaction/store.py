"""SQL of InteractionService. Takes a Connection; the service owns the transaction.

Every query filters on `tenant_id`. Rows come back as dataclasses with database values
(enum labels as text, jsonb as dicts, ids as strings); the service turns them into protobuf.
Scopes are `room` strings: a breakout room id, or None for the main room.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from classmesh.core.audit import insert_audit

__all__ = [
    "ChatRow",
    "HandRow",
    "InteractionStore",
    "ParticipantInfo",
    "PollRow",
    "QuestionRow",
    "SceneRow",
    "StudioRow",
    "TimerRow",
    "WhiteboardRow",
    "WhiteboardTooLarge",
]


class WhiteboardTooLarge(Exception):
    """The whiteboard's size check in the database refused an update."""


def _u(value: str) -> uuid.UUID:
    return uuid.UUID(value)


def _ou(value: str | None) -> uuid.UUID | None:
    return uuid.UUID(value) if value else None


def _s(value: Any) -> str | None:
    return str(value) if value is not None else None


def _room_clause(column: str, index: int) -> str:
    """`column` equals the scope parameter $index (NULL = main room)."""
    return f"{column} IS NOT DISTINCT FROM ${index}::uuid"


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class ParticipantInfo:
    """A user's membership with what interaction rules need (permissions, current room)."""

    id: str
    user_id: str
    display_name: str
    role: str
    status: str
    guest: bool
    permissions: dict[str, Any]
    chat_muted: bool
    #: The open breakout room the participant is in right now (None: the main room).
    room_id: str | None


@dataclass(frozen=True, slots=True)
class ChatRow:
    id: str
    session_id: str
    room_id: str | None
    user_id: str
    sender_name: str
    sender_role: str
    sender_participant_id: str
    recipient_user_id: str
    message_type: str
    body: str
    sent_at: datetime
    deleted_at: datetime | None
    seq: int


@dataclass(frozen=True, slots=True)
class HandRow:
    id: str
    session_id: str
    room_id: str | None
    user_id: str
    raiser_name: str
    raiser_role: str
    raiser_participant_id: str
    status: str
    raised_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str
    acknowledged_by_name: str
    lowered_at: datetime | None
    lowered_by: str
    lowered_by_name: str
    position: int


@dataclass(frozen=True, slots=True)
class QuestionRow:
    id: str
    session_id: str
    room_id: str | None
    user_id: str
    author_name: str
    author_role: str
    author_participant_id: str
    anonymous: bool
    body: str
    status: str
    upvotes: int
    downvotes: int
    score: int
    pinned: bool
    answered: bool
    answered_at: datetime | None
    answered_by: str
    answerer_name: str
    answer_text: str
    answered_live: bool
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    my_vote: int


@dataclass(frozen=True, slots=True)
class PollRow:
    id: str
    session_id: str
    room_id: str | None
    question: str
    options: list[str]
    allow_multiple: bool
    max_selections: int
    anonymous: bool
    show_results_live: bool
    status: str
    created_by: str
    creator_name: str
    creator_role: str
    created_at: datetime
    closed_at: datetime | None
    closes_at: datetime | None
    respondent_salt: bytes
    my_selection: list[int]


@dataclass(frozen=True, slots=True)
class WhiteboardRow:
    id: str
    session_id: str
    room_id: str | None
    version: int
    size_bytes: int
    updated_at: datetime
    updated_actor: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TimerRow:
    id: str
    session_id: str
    room_id: str | None
    status: str
    mode: str
    duration_seconds: int | None
    elapsed_ms: int
    started_at: datetime | None
    paused_at: datetime | None
    completed_at: datetime | None
    ends_at: datetime | None
    completed_focus_count: int
    updated_at: datetime
    updated_actor: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SceneRow:
    id: str
    session_id: str
    name: str
    layout: str
    slide_deck_id: str
    slide_deck_url: str
    slide_count: int
    current_slide: int
    metadata: dict[str, Any]
    is_active: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class StudioRow:
    session_id: str
    active_scene_id: str | None
    layout: str
    deck_id: str
    slide_index: int
    slide_count: int
    slide_url: str
    seq: int
    updated_actor: dict[str, Any]
    updated_at: datetime


def _chat(r: asyncpg.Record) -> ChatRow:
    return ChatRow(
        id=str(r["id"]),
        session_id=str(r["session_id"]),
        room_id=_s(r["breakout_room_id"]),
        user_id=r["user_id"],
        sender_name=r["sender_name"] or r["user_id"],
        sender_role=r["sender_role"] or "",
        sender_participant_id=_s(r["sender_participant_id"]) or "",
        recipient_user_id=r["recipient_user_id"] or "",
        message_type=r["message_type"],
        body=r["body"],
        sent_at=r["sent_at"],
        deleted_at=r["deleted_at"],
        seq=int(r["seq"] or 0),
    )


def _hand(r: asyncpg.Record) -> HandRow:
    return HandRow(
        id=str(r["id"]),
        session_id=str(r["session_id"]),
        room_id=_s(r["breakout_room_id"]),
        user_id=r["user_id"],
        raiser_name=r["raiser_name"] or r["user_id"],
        raiser_role=r["raiser_role"] or "",
        raiser_participant_id=_s(r["raiser_participant_id"]) or "",
        status=r["status"],
        raised_at=r["raised_at"],
        acknowledged_at=r["acknowledged_at"],
        acknowledged_by=r["acknowledged_by"] or "",
        acknowledged_by_name=r["acknowledged_by_name"] or "",
        lowered_at=r["lowered_at"],
        lowered_by=r["lowered_by"] or "",
        lowered_by_name=r["lowered_by_name"] or "",
        position=int(r["position"] or 0),
    )


def _question(r: asyncpg.Record) -> QuestionRow:
    return QuestionRow(
        id=str(r["id"]),
        session_id=str(r["session_id"]),
        room_id=_s(r["breakout_room_id"]),
        user_id=r["user_id"],
        author_name=r["author_name"] or r["user_id"],
        author_role=r["author_role"] or "",
        author_participant_id=_s(r["author_participant_id"]) or "",
        anonymous=r["is_anonymous"],
        body=r["body"],
        status=r["status"],
        upvotes=r["upvotes"],
        downvotes=r["downvotes"],
        score=r["score"],
        pinned=r["pinned"],
        answered=r["answered"],
        answered_at=r["answered_at"],
        answered_by=r["answered_by"] or "",
        answerer_name=r["answerer_name"] or "",
        answer_text=r["answer_text"] or "",
        answered_live=r["answered_live"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        deleted_at=r["deleted_at"],
        my_vote=int(r["my_vote"] or 0),
    )


def _poll(r: asyncpg.Record) -> PollRow:
    return PollRow(
        id=str(r["id"]),
        session_id=str(r["session_id"]),
        room_id=_s(r["breakout_room_id"]),
        question=r["question"],
        options=[str(o) for o in r["options"]],
        allow_multiple=r["allow_multiple"],
        max_selections=r["max_selections"],
        anonymous=r["is_anonymous"],
        show_results_live=r["show_results_live"],
        status=r["status"],
        created_by=r["created_by"],
        creator_name=r["creator_name"] or r["created_by"],
        creator_role=r["creator_role"] or "",
        created_at=r["created_at"],
        closed_at=r["closed_at"],
        closes_at=r["closes_at"],
        respondent_salt=bytes(r["respondent_salt"]),
        my_selection=list(r["my_selection"] or []),
    )


def _whiteboard(r: asyncpg.Record) -> WhiteboardRow:
    return WhiteboardRow(
        id=str(r["id"]),
        session_id=str(r["session_id"]),
        room_id=_s(r["breakout_room_id"]),
        version=int(r["version"]),
        size_bytes=int(r["size_bytes"]),
        updated_at=r["updated_at"],
        updated_actor=dict(r["updated_actor"] or {}),
    )


def _timer(r: asyncpg.Record) -> TimerRow:
    return TimerRow(
        id=str(r["id"]),
        session_id=str(r["session_id"]),
        room_id=_s(r["breakout_room_id"]),
        status=r["status"],
        mode=r["mode"],
        duration_seconds=r["duration_seconds"],
        elapsed_ms=int(r["elapsed_ms"]),
        started_at=r["started_at"],
        paused_at=r["paused_at"],
        completed_at=r["completed_at"],
        ends_at=r["ends_at"],
        completed_focus_count=r["completed_focus_count"],
        updated_at=r["updated_at"],
        updated_actor=dict(r["updated_actor"] or {}),
    )


def _scene(r: asyncpg.Record) -> SceneRow:
    return SceneRow(
        id=str(r["id"]),
        session_id=str(r["session_id"]),
        name=r["name"],
        layout=r["layout"],
        slide_deck_id=r["slide_deck_id"] or "",
        slide_deck_url=r["slide_deck_url"] or "",
        slide_count=r["slide_count"],
        current_slide=r["current_slide"],
        metadata=dict(r["metadata"] or {}),
        is_active=r["is_active"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )


def _studio(r: asyncpg.Record) -> StudioRow:
    return StudioRow(
        session_id=str(r["session_id"]),
        active_scene_id=_s(r["active_scene_id"]),
        layout=r["layout"],
        deck_id=r["deck_id"] or "",
        slide_index=r["slide_index"],
        slide_count=r["slide_count"],
        slide_url=r["slide_url"] or "",
        seq=int(r["seq"]),
        updated_actor=dict(r["updated_actor"] or {}),
        updated_at=r["updated_at"],
    )


def _participant_name(alias: str, user_col: str) -> str:
    """A scalar subquery: display name of the participant `user_col` in the row's session."""
    return (
        f"(SELECT sp.display_name FROM session_participants sp WHERE sp.session_id = "
        f"{alias}.session_id AND sp.user_id = {alias}.{user_col})"
    )


_CHAT_COLS = (
    "m.id, m.session_id, m.breakout_room_id, m.user_id, m.recipient_user_id, "
    "m.message_type::text AS message_type, m.body, m.sent_at, m.deleted_at, m.seq, "
    "p.display_name AS sender_name, p.role::text AS sender_role, p.id AS sender_participant_id"
)
_CHAT_FROM = (
    "chat_messages m LEFT JOIN session_participants p "
    "ON p.session_id = m.session_id AND p.user_id = m.user_id"
)

_HAND_COLS = (
    "h.id, h.session_id, h.breakout_room_id, h.user_id, h.status::text AS status, h.raised_at, "
    "h.acknowledged_at, h.acknowledged_by, h.lowered_at, h.lowered_by, "
    "p.display_name AS raiser_name, p.role::text AS raiser_role, p.id AS raiser_participant_id, "
    + _participant_name("h", "acknowledged_by")
    + " AS acknowledged_by_name, "
    + _participant_name("h", "lowered_by")
    + " AS lowered_by_name, "
    "CASE WHEN h.status = 'raised' THEN (SELECT count(*) FROM hand_raises q "
    "WHERE q.session_id = h.session_id AND q.status = 'raised' "
    "AND q.breakout_room_id IS NOT DISTINCT FROM h.breakout_room_id "
    "AND (q.raised_at, q.id) <= (h.raised_at, h.id)) ELSE 0 END AS position"
)
_HAND_FROM = (
    "hand_raises h LEFT JOIN session_participants p "
    "ON p.session_id = h.session_id AND p.user_id = h.user_id"
)


def _question_cols(viewer_param: int) -> str:
    return (
        "q.id, q.session_id, q.breakout_room_id, q.user_id, q.is_anonymous, q.body, "
        "q.status::text AS status, q.upvotes, q.downvotes, q.score, q.pinned, q.answered, "
        "q.answered_at, q.answered_by, q.answer_text, q.answered_live, q.created_at, "
        "q.updated_at, q.deleted_at, "
        "p.display_name AS author_name, p.role::text AS author_role, "
        "p.id AS author_participant_id, "
        + _participant_name("q", "answered_by")
        + " AS answerer_name, "
        f"(SELECT v.value FROM question_votes v WHERE v.question_id = q.id "
        f"AND v.user_id = ${viewer_param}) AS my_vote"
    )


_QUESTION_FROM = (
    "questions q LEFT JOIN session_participants p "
    "ON p.session_id = q.session_id AND p.user_id = q.user_id"
)


def _poll_cols(viewer_param: int) -> str:
    return (
        "o.id, o.session_id, o.breakout_room_id, o.question, o.options, o.allow_multiple, "
        "o.max_selections, o.is_anonymous, o.show_results_live, o.status::text AS status, "
        "o.created_by, o.created_at, o.closed_at, o.closes_at, o.respondent_salt, "
        "p.display_name AS creator_name, p.role::text AS creator_role, "
        f"(SELECT r.selected_options FROM poll_responses r WHERE r.poll_id = o.id "
        f"AND r.user_id = ${viewer_param}) AS my_selection"
    )


_POLL_FROM = (
    "session_polls o LEFT JOIN session_participants p "
    "ON p.session_id = o.session_id AND p.user_id = o.created_by"
)
_WB_COLS = "id, session_id, breakout_room_id, version, size_bytes, updated_at, updated_actor"
_TIMER_COLS = (
    "id, session_id, breakout_room_id, status::text AS status, mode, duration_seconds, "
    "elapsed_ms, started_at, paused_at, completed_at, ends_at, completed_focus_count, "
    "updated_at, updated_actor"
)
_SCENE_COLS = (
    "id, session_id, name, layout, slide_deck_id, slide_deck_url, slide_count, current_slide, "
    "metadata, is_active, created_at, updated_at"
)


class InteractionStore:
    """Every query of InteractionService."""

    # ------------------------------------------------------------------ session

    async def db_now(self, conn: asyncpg.Connection) -> datetime:
        value: datetime = await conn.fetchval("SELECT clock_timestamp()")
        return value

    async def reserve_seq(self, conn: asyncpg.Connection, tenant_id: str, session_id: str) -> int:
        """The seq the next `append_event` of this transaction gets.

        Takes the session row lock that `append_event` would take anyway (appends queue on
        it, so nobody else can append in between): a payload can then quote its own seq.
        """
        value = await conn.fetchval(
            "SELECT last_seq FROM sessions WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
            _u(session_id),
            _u(tenant_id),
        )
        return int(value or 0) + 1

    async def last_seq(self, conn: asyncpg.Connection, tenant_id: str, session_id: str) -> int:
        value = await conn.fetchval(
            "SELECT last_seq FROM sessions WHERE id = $1 AND tenant_id = $2",
            _u(session_id),
            _u(tenant_id),
        )
        return int(value or 0)

    async def participant(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str, user_id: str
    ) -> ParticipantInfo | None:
        row = await conn.fetchrow(
            "SELECT p.id, p.user_id, p.display_name, p.role::text AS role, "
            "p.status::text AS status, p.is_guest, p.permissions, p.chat_muted, "
            "(SELECT ra.breakout_room_id FROM room_assignments ra JOIN breakout_rooms b "
            "ON b.id = ra.breakout_room_id AND b.status = 'open' "
            "WHERE ra.participant_id = p.id AND ra.left_at IS NULL LIMIT 1) AS room_id "
            "FROM session_participants p "
            "WHERE p.tenant_id = $1 AND p.session_id = $2 AND p.user_id = $3",
            _u(tenant_id),
            _u(session_id),
            user_id,
        )
        if row is None:
            return None
        return ParticipantInfo(
            id=str(row["id"]),
            user_id=row["user_id"],
            display_name=row["display_name"],
            role=row["role"],
            status=row["status"],
            guest=row["is_guest"],
            permissions=dict(row["permissions"] or {}),
            chat_muted=row["chat_muted"],
            room_id=_s(row["room_id"]),
        )

    async def breakout_room_status(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str, room_id: str
    ) -> str | None:
        value: str | None = await conn.fetchval(
            "SELECT status::text FROM breakout_rooms "
            "WHERE tenant_id = $1 AND session_id = $2 AND id = $3",
            _u(tenant_id),
            _u(session_id),
            _u(room_id),
        )
        return value

    #: Audit rows go through the one shared insert.
    insert_audit = staticmethod(insert_audit)

    # ------------------------------------------------------------------ chat

    async def insert_chat(
        self,
        conn: asyncpg.Connection,
        *,
        message_id: str,
        tenant_id: str,
        session_id: str,
        room_id: str | None,
        user_id: str,
        recipient_user_id: str,
        message_type: str,
        body: str,
        seq: int,
    ) -> ChatRow:
        await conn.execute(
            "INSERT INTO chat_messages (id, tenant_id, session_id, scope, breakout_room_id, "
            "user_id, recipient_user_id, message_type, body, seq, sent_at) "
            "VALUES ($1, $2, $3, $4::chat_scope, $5, $6, $7, $8::chat_message_type, $9, $10, "
            "clock_timestamp())",
            _u(message_id),
            _u(tenant_id),
            _u(session_id),
            "breakout" if room_id else "main",
            _ou(room_id),
            user_id,
            recipient_user_id or None,
            message_type,
            body,
            seq,
        )
        row = await self.get_chat(conn, tenant_id, session_id, message_id)
        assert row is not None
        return row

    async def get_chat(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str, message_id: str
    ) -> ChatRow | None:
        r = await conn.fetchrow(
            f"SELECT {_CHAT_COLS} FROM {_CHAT_FROM} "
            "WHERE m.tenant_id = $1 AND m.session_id = $2 AND m.id = $3",
            _u(tenant_id),
            _u(session_id),
            _u(message_id),
        )
        return _chat(r) if r is not None else None

    async def delete_chat(
        self, conn: asyncpg.Connection, tenant_id: str, message_id: str, deleted_by: str
    ) -> None:
        await conn.execute(
            "UPDATE chat_messages SET deleted_at = clock_timestamp(), deleted_by = $3 "
            "WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
            _u(tenant_id),
            _u(message_id),
            deleted_by[:255],
        )

    async def scrub_chat_event(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str, seq: int
    ) -> None:
        """Remove a deleted message's text from its chat_message_posted event (replays)."""
        await conn.execute(
            "UPDATE session_events SET payload = jsonb_set(payload #- '{message,text}', "
            "'{message,deleted}', 'true') WHERE tenant_id = $1 AND session_id = $2 "
            "AND seq = $3 AND type = 'chat_message_posted'",
            _u(tenant_id),
            _u(session_id),
            seq,
        )

    async def list_chat(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        room_id: str | None,
        viewer: str | None,
        include_deleted: bool,
        before_seq: int | None,
        before_time: datetime | None,
        after_time: datetime | None,
        limit: int,
    ) -> list[ChatRow]:
        """Newest first. `viewer` None sees every private message (moderators)."""
        where = ["m.tenant_id = $1", "m.session_id = $2", _room_clause("m.breakout_room_id", 3)]
        args: list[Any] = [_u(tenant_id), _u(session_id), _ou(room_id)]
        if viewer is not None:
            args.append(viewer)
            n = len(args)
            where.append(
                f"(m.recipient_user_id IS NULL OR m.user_id = ${n} OR m.recipient_user_id = ${n})"
            )
        if not include_deleted:
            where.append("m.deleted_at IS NULL")
        if before_seq is not None:
            args.append(before_seq)
            where.append(f"m.seq < ${len(args)}")
        if before_time is not None:
            args.append(before_time)
            where.append(f"m.sent_at < ${len(args)}")
        if after_time is not None:
            args.append(after_time)
            where.append(f"m.sent_at > ${len(args)}")
        args.append(limit)
        rows = await conn.fetch(
            f"SELECT {_CHAT_COLS} FROM {_CHAT_FROM} WHERE {' AND '.join(where)} "
            f"ORDER BY m.seq DESC NULLS LAST, m.sent_at DESC, m.id DESC LIMIT ${len(args)}",
            *args,
        )
        return [_chat(r) for r in rows]

    async def purge_chat(self, conn: asyncpg.Connection, *, older_than_days: int) -> int:
        """Delete chat older than the retention window, and its text in the event log."""
        total = 0
        while True:
            status = await conn.execute(
                "DELETE FROM chat_messages WHERE ctid IN (SELECT ctid FROM chat_messages "
                "WHERE sent_at < now() - make_interval(days => $1) LIMIT 5000)",
                older_than_days,
            )
            count = int(status.rsplit(" ", 1)[1])
            total += count
            if count < 5000:
                break
        # The log keeps that a message was posted (replay timelines), not what it said.
        await conn.execute(
            "UPDATE session_events SET payload = jsonb_set(payload #- '{message,text}', "
            "'{message,deleted}', 'true') "
            "WHERE type = 'chat_message_posted' AND created_at < now() - make_interval(days => $1) "
            "AND payload->'message' ? 'text'",
            older_than_days,
        )
        return total

    # ------------------------------------------------------------------ hands

    async def get_hand(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str, hand_id: str
    ) -> HandRow | None:
        r = await conn.fetchrow(
            f"SELECT {_HAND_COLS} FROM {_HAND_FROM} "
            "WHERE h.tenant_id = $1 AND h.session_id = $2 AND h.id = $3",
            _u(tenant_id),
            _u(session_id),
            _u(hand_id),
        )
        return _hand(r) if r is not None else None

    async def active_hand(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str, user_id: str
    ) -> HandRow | None:
        r = await conn.fetchrow(
            f"SELECT {_HAND_COLS} FROM {_HAND_FROM} "
            "WHERE h.tenant_id = $1 AND h.session_id = $2 AND h.user_id = $3 "
            "AND h.status = 'raised'",
            _u(tenant_id),
            _u(session_id),
            user_id,
        )
        return _hand(r) if r is not None else None

    async def lock_hand(self, conn: asyncpg.Connection, tenant_id: str, hand_id: str) -> str | None:
        value: str | None = await conn.fetchval(
            "SELECT status::text FROM hand_raises WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
            _u(tenant_id),
            _u(hand_id),
        )
        return value

    async def insert_hand(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        room_id: str | None,
        user_id: str,
    ) -> str | None:
        """The new hand raise's id, or None when the user already has an active one."""
        value = await conn.fetchval(
            "INSERT INTO hand_raises (tenant_id, session_id, breakout_room_id, user_id) "
            "VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (session_id, user_id) WHERE status = 'raised' DO NOTHING RETURNING id",
            _u(tenant_id),
            _u(session_id),
            _ou(room_id),
            user_id,
        )
        return _s(value)

    async def end_hand(
        self, conn: asyncpg.Connection, tenant_id: str, hand_id: str, *, status: str, by: str
    ) -> None:
        if status == "acknowledged":
            sql = (
                "UPDATE hand_raises SET status = 'acknowledged', "
                "acknowledged_at = clock_timestamp(), acknowledged_by = $3 "
                "WHERE tenant_id = $1 AND id = $2"
            )
        else:
            sql = (
                "UPDATE hand_raises SET status = 'lowered', lowered_at = clock_timestamp(), "
                "lowered_by = $3 WHERE tenant_id = $1 AND id = $2"
            )
        await conn.execute(sql, _u(tenant_id), _u(hand_id), by[:255])

    async def list_hands(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        room_id: str | None,
        include_inactive: bool,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> tuple[list[HandRow], int]:
        where = ["h.tenant_id = $1", "h.session_id = $2", _room_clause("h.breakout_room_id", 3)]
        args: list[Any] = [_u(tenant_id), _u(session_id), _ou(room_id)]
        if not include_inactive:
            where.append("h.status = 'raised'")
        if after is not None:
            args.extend([after[0], _u(after[1])])
            where.append(f"(h.raised_at, h.id) > (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        rows = await conn.fetch(
            f"SELECT {_HAND_COLS} FROM {_HAND_FROM} WHERE {' AND '.join(where)} "
            f"ORDER BY h.raised_at, h.id LIMIT ${len(args)}",
            *args,
        )
        active = await conn.fetchval(
            "SELECT count(*) FROM hand_raises WHERE tenant_id = $1 AND session_id = $2 "
            f"AND {_room_clause('breakout_room_id', 3)} AND status = 'raised'",
            _u(tenant_id),
            _u(session_id),
            _ou(room_id),
        )
        return [_hand(r) for r in rows], int(active)

    # ------------------------------------------------------------------ questions

    async def get_question(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        question_id: str,
        viewer: str,
        *,
        for_update: bool = False,
    ) -> QuestionRow | None:
        if for_update:
            await conn.execute(
                "SELECT 1 FROM questions WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
                _u(tenant_id),
                _u(question_id),
            )
        r = await conn.fetchrow(
            f"SELECT {_question_cols(4)} FROM {_QUESTION_FROM} "
            "WHERE q.tenant_id = $1 AND q.session_id = $2 AND q.id = $3",
            _u(tenant_id),
            _u(session_id),
            _u(question_id),
            viewer,
        )
        return _question(r) if r is not None else None

    async def duplicate_question(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        user_id: str,
        normalised: str,
    ) -> bool:
        value = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM questions WHERE tenant_id = $1 AND session_id = $2 "
            "AND user_id = $3 AND deleted_at IS NULL "
            "AND lower(regexp_replace(btrim(body), '\\s+', ' ', 'g')) = $4)",
            _u(tenant_id),
            _u(session_id),
            user_id,
            normalised,
        )
        return bool(value)

    async def insert_question(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        room_id: str | None,
        user_id: str,
        anonymous: bool,
        body: str,
        status: str,
    ) -> str:
        value = await conn.fetchval(
            "INSERT INTO questions (tenant_id, session_id, breakout_room_id, user_id, "
            "is_anonymous, body, status) VALUES ($1, $2, $3, $4, $5, $6, $7::question_status) "
            "RETURNING id",
            _u(tenant_id),
            _u(session_id),
            _ou(room_id),
            user_id,
            anonymous,
            body,
            status,
        )
        return str(value)

    async def set_vote(
        self, conn: asyncpg.Connection, tenant_id: str, question_id: str, user_id: str, value: int
    ) -> int:
        """Set (or with 0 remove) a user's vote; returns the previous value (0 = none)."""
        previous = await conn.fetchval(
            "SELECT value FROM question_votes WHERE question_id = $1 AND user_id = $2 FOR UPDATE",
            _u(question_id),
            user_id,
        )
        previous = int(previous or 0)
        if previous == value:
            return previous
        if value == 0:
            await conn.execute(
                "DELETE FROM question_votes WHERE question_id = $1 AND user_id = $2",
                _u(question_id),
                user_id,
            )
        else:
            await conn.execute(
                "INSERT INTO question_votes (tenant_id, question_id, user_id, value) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (question_id, user_id) "
                "DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
                _u(tenant_id),
                _u(question_id),
                user_id,
                value,
            )
        up = (1 if value == 1 else 0) - (1 if previous == 1 else 0)
        down = (1 if value == -1 else 0) - (1 if previous == -1 else 0)
        await conn.execute(
            "UPDATE questions SET upvotes = upvotes + $3, downvotes = downvotes + $4, "
            "updated_at = now() WHERE tenant_id = $1 AND id = $2",
            _u(tenant_id),
            _u(question_id),
            up,
            down,
        )
        return previous

    async def update_question(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        question_id: str,
        fields: Mapping[str, Any],
    ) -> None:
        sets, args = [], [_u(tenant_id), _u(question_id)]
        for name, value in fields.items():
            args.append(value)
            cast = "::question_status" if name == "status" else ""
            sets.append(f"{name} = ${len(args)}{cast}")
        sets.append("updated_at = now()")
        await conn.execute(
            f"UPDATE questions SET {', '.join(sets)} WHERE tenant_id = $1 AND id = $2", *args
        )

    async def list_questions(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        room_id: str | None,
        viewer: str,
        where_status: str,
        newest: bool,
        after: Sequence[Any] | None,
        limit: int,
    ) -> tuple[list[QuestionRow], int]:
        """`where_status` is a fixed SQL condition on q built by the service."""
        where = [
            "q.tenant_id = $1",
            "q.session_id = $2",
            _room_clause("q.breakout_room_id", 3),
            where_status,
        ]
        args: list[Any] = [_u(tenant_id), _u(session_id), _ou(room_id), viewer]
        total = await conn.fetchval(
            f"SELECT count(*) FROM questions q WHERE {' AND '.join(where)}", *args[:3]
        )
        if newest:
            order = "q.created_at DESC, q.id DESC"
            if after is not None:
                args.extend([after[0], _u(after[1])])
                where.append("(q.created_at, q.id) < ($5::timestamptz, $6::uuid)")
        else:
            order = "(NOT q.pinned)::int, -q.score, q.created_at, q.id"
            if after is not None:
                args.extend([int(after[0]), int(after[1]), after[2], _u(after[3])])
                where.append(
                    "((NOT q.pinned)::int, -q.score, q.created_at, q.id) "
                    "> ($5::int, $6::int, $7::timestamptz, $8::uuid)"
                )
        args.append(limit)
        rows = await conn.fetch(
            f"SELECT {_question_cols(4)} FROM {_QUESTION_FROM} WHERE {' AND '.join(where)} "
            f"ORDER BY {order} LIMIT ${len(args)}",
            *args,
        )
        return [_question(r) for r in rows], int(total)

    # ------------------------------------------------------------------ polls

    async def insert_poll(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        room_id: str | None,
        question: str,
        options: list[str],
        allow_multiple: bool,
        max_selections: int,
        anonymous: bool,
        show_results_live: bool,
        created_by: str,
        duration_s: float | None,
    ) -> str:
        value = await conn.fetchval(
            "INSERT INTO session_polls (tenant_id, session_id, breakout_room_id, question, "
            "options, allow_multiple, max_selections, is_anonymous, show_results_live, "
            "created_by, closes_at) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, "
            "CASE WHEN $11::float8 IS NULL THEN NULL "
            "ELSE now() + make_interval(secs => $11::float8) END) RETURNING id",
            _u(tenant_id),
            _u(session_id),
            _ou(room_id),
            question,
            list(options),
            allow_multiple,
            max_selections,
            anonymous,
            show_results_live,
            created_by,
            duration_s,
        )
        return str(value)

    async def get_poll(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        poll_id: str,
        viewer: str,
        *,
        for_update: bool = False,
    ) -> PollRow | None:
        if for_update:
            await conn.execute(
                "SELECT 1 FROM session_polls WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
                _u(tenant_id),
                _u(poll_id),
            )
        r = await conn.fetchrow(
            f"SELECT {_poll_cols(4)} FROM {_POLL_FROM} "
            "WHERE o.tenant_id = $1 AND o.session_id = $2 AND o.id = $3",
            _u(tenant_id),
            _u(session_id),
            _u(poll_id),
            viewer,
        )
        return _poll(r) if r is not None else None

    async def set_response(
        self, conn: asyncpg.Connection, tenant_id: str, poll_id: str, user_id: str, picks: list[int]
    ) -> list[int] | None:
        """Store the user's selection; returns the previous one (None: first response)."""
        previous = await conn.fetchval(
            "SELECT selected_options FROM poll_responses WHERE poll_id = $1 AND user_id = $2",
            _u(poll_id),
            user_id,
        )
        await conn.execute(
            "INSERT INTO poll_responses (tenant_id, poll_id, user_id, selected_options) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (poll_id, user_id) DO UPDATE SET "
            "selected_options = EXCLUDED.selected_options, updated_at = now()",
            _u(tenant_id),
            _u(poll_id),
            user_id,
            picks,
        )
        return list(previous) if previous is not None else None

    async def poll_counts(
        self, conn: asyncpg.Connection, tenant_id: str, poll_id: str
    ) -> tuple[dict[int, int], int]:
        rows = await conn.fetch(
            "SELECT o AS idx, count(*) AS n FROM poll_responses r, "
            "unnest(r.selected_options) AS o WHERE r.tenant_id = $1 AND r.poll_id = $2 "
            "GROUP BY o",
            _u(tenant_id),
            _u(poll_id),
        )
        respondents = await conn.fetchval(
            "SELECT count(*) FROM poll_responses WHERE tenant_id = $1 AND poll_id = $2",
            _u(tenant_id),
            _u(poll_id),
        )
        return {int(r["idx"]): int(r["n"]) for r in rows}, int(respondents)

    async def poll_respondents(
        self, conn: asyncpg.Connection, tenant_id: str, poll_id: str
    ) -> list[asyncpg.Record]:
        return list(
            await conn.fetch(
                "SELECT r.user_id, r.selected_options, r.updated_at, p.display_name "
                "FROM poll_responses r JOIN session_polls o ON o.id = r.poll_id "
                "LEFT JOIN session_participants p ON p.session_id = o.session_id "
                "AND p.user_id = r.user_id WHERE r.tenant_id = $1 AND r.poll_id = $2 "
                "ORDER BY r.responded_at, r.user_id",
                _u(tenant_id),
                _u(poll_id),
            )
        )

    async def close_poll(self, conn: asyncpg.Connection, tenant_id: str, poll_id: str) -> None:
        await conn.execute(
            "UPDATE session_polls SET status = 'closed', closed_at = now() "
            "WHERE tenant_id = $1 AND id = $2 AND status = 'open'",
            _u(tenant_id),
            _u(poll_id),
        )

    async def list_polls(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        room_id: str | None,
        viewer: str,
        status: str | None,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[PollRow]:
        where = ["o.tenant_id = $1", "o.session_id = $2", _room_clause("o.breakout_room_id", 3)]
        args: list[Any] = [_u(tenant_id), _u(session_id), _ou(room_id), viewer]
        if status is not None:
            args.append(status)
            where.append(f"o.status = ${len(args)}::poll_status")
        if after is not None:
            args.extend([after[0], _u(after[1])])
            where.append(f"(o.created_at, o.id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        rows = await conn.fetch(
            f"SELECT {_poll_cols(4)} FROM {_POLL_FROM} WHERE {' AND '.join(where)} "
            f"ORDER BY o.created_at DESC, o.id DESC LIMIT ${len(args)}",
            *args,
        )
        return [_poll(r) for r in rows]

    async def due_polls(self, conn: asyncpg.Connection, limit: int) -> list[tuple[str, str, str]]:
        """(tenant, session, poll) of open polls past closes_at, locked, skipping locked."""
        rows = await conn.fetch(
            "SELECT tenant_id, session_id, id FROM session_polls "
            "WHERE status = 'open' AND closes_at <= now() "
            "ORDER BY closes_at LIMIT $1 FOR UPDATE SKIP LOCKED",
            limit,
        )
        return [(str(r["tenant_id"]), str(r["session_id"]), str(r["id"])) for r in rows]

    # ------------------------------------------------------------------ whiteboards

    async def whiteboard(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        room_id: str | None,
        *,
        for_update: bool = False,
    ) -> WhiteboardRow | None:
        if for_update:
            await conn.execute(
                "INSERT INTO whiteboards (tenant_id, session_id, breakout_room_id, canvas) "
                "VALUES ($1, $2, $3, '{\"elements\": {}}'::jsonb) "
                "ON CONFLICT (session_id, breakout_room_id) DO NOTHING",
                _u(tenant_id),
                _u(session_id),
                _ou(room_id),
            )
        r = await conn.fetchrow(
            f"SELECT {_WB_COLS} FROM whiteboards WHERE tenant_id = $1 AND session_id = $2 "
            f"AND {_room_clause('breakout_room_id', 3)}" + (" FOR UPDATE" if for_update else ""),
            _u(tenant_id),
            _u(session_id),
            _ou(room_id),
        )
        return _whiteboard(r) if r is not None else None

    async def whiteboard_elements(
        self, conn: asyncpg.Connection, tenant_id: str, board_id: str
    ) -> dict[str, Any]:
        value = await conn.fetchval(
            "SELECT coalesce(canvas->'elements', '{}'::jsonb) FROM whiteboards "
            "WHERE tenant_id = $1 AND id = $2",
            _u(tenant_id),
            _u(board_id),
        )
        return dict(value or {})

    async def element_marks(
        self, conn: asyncpg.Connection, tenant_id: str, board_id: str, ids: Sequence[str]
    ) -> dict[str, tuple[int, int]]:
        """(version last changed, stacking ordinal) of the existing elements among `ids`."""
        rows = await conn.fetch(
            "SELECT k, (w.canvas->'elements'->k->>'_v')::bigint AS v, "
            "(w.canvas->'elements'->k->>'_o')::bigint AS o "
            "FROM whiteboards w, unnest($3::text[]) AS k "
            "WHERE w.tenant_id = $1 AND w.id = $2 AND w.canvas->'elements' ? k",
            _u(tenant_id),
            _u(board_id),
            list(ids),
        )
        return {r["k"]: (int(r["v"] or 0), int(r["o"] or 0)) for r in rows}

    async def apply_elements(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        board_id: str,
        removed: Sequence[str],
        upserts: Mapping[str, Any],
        updated_by: str,
        actor: Mapping[str, Any],
    ) -> tuple[int, int]:
        """Remove and replace elements in one statement; returns (version, size_bytes).

        The size is kept as the sum of the elements' JSON text: what a replaced element
        weighed is subtracted, what the new ones weigh is added.
        """
        touched = list(dict.fromkeys([*removed, *upserts]))
        try:
            row = await conn.fetchrow(
                "UPDATE whiteboards w SET "
                "canvas = jsonb_set(w.canvas, '{elements}', "
                "(coalesce(w.canvas->'elements', '{}'::jsonb) - $3::text[]) || $4::jsonb), "
                "size_bytes = w.size_bytes "
                "- coalesce((SELECT sum(octet_length((w.canvas->'elements'->k)::text)) "
                "FROM unnest($5::text[]) AS k WHERE w.canvas->'elements' ? k), 0) "
                "+ coalesce((SELECT sum(octet_length(e.value::text)) "
                "FROM jsonb_each($4::jsonb) AS e), 0), "
                "version = w.version + 1, updated_by = $6, updated_actor = $7::jsonb, "
                "updated_at = clock_timestamp() "
                "WHERE w.tenant_id = $1 AND w.id = $2 RETURNING version, size_bytes",
                _u(tenant_id),
                _u(board_id),
                list(removed),
                dict(upserts),
                touched,
                updated_by[:255],
                dict(actor),
            )
        except asyncpg.exceptions.CheckViolationError as exc:
            if exc.constraint_name == "whiteboards_canvas_size_check":
                raise WhiteboardTooLarge() from exc
            raise
        assert row is not None
        return int(row["version"]), int(row["size_bytes"])

    async def clear_whiteboard(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        board_id: str,
        updated_by: str,
        actor: Mapping[str, Any],
    ) -> None:
        await conn.execute(
            "UPDATE whiteboards SET canvas = '{\"elements\": {}}'::jsonb, size_bytes = 0, "
            "version = version + 1, updated_by = $3, updated_actor = $4::jsonb, "
            "updated_at = clock_timestamp() WHERE tenant_id = $1 AND id = $2",
            _u(tenant_id),
            _u(board_id),
            updated_by[:255],
            dict(actor),
        )

    # ------------------------------------------------------------------ timers

    async def timer(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        room_id: str | None,
        *,
        for_update: bool = False,
    ) -> TimerRow | None:
        if for_update:
            await conn.execute(
                "INSERT INTO study_timers (tenant_id, session_id, breakout_room_id) "
                "VALUES ($1, $2, $3) ON CONFLICT (session_id, breakout_room_id) DO NOTHING",
                _u(tenant_id),
                _u(session_id),
                _ou(room_id),
            )
        r = await conn.fetchrow(
            f"SELECT {_TIMER_COLS} FROM study_timers WHERE tenant_id = $1 AND session_id = $2 "
            f"AND {_room_clause('breakout_room_id', 3)}" + (" FOR UPDATE" if for_update else ""),
            _u(tenant_id),
            _u(session_id),
            _ou(room_id),
        )
        return _timer(r) if r is not None else None

    async def update_timer(
        self, conn: asyncpg.Connection, tenant_id: str, timer_id: str, fields: Mapping[str, Any]
    ) -> TimerRow:
        sets, args = [], [_u(tenant_id), _u(timer_id)]
        for name, value in fields.items():
            args.append(value)
            cast = {"status": "::timer_status", "updated_actor": "::jsonb"}.get(name, "")
            sets.append(f"{name} = ${len(args)}{cast}")
        sets.append("version = version + 1")
        r = await conn.fetchrow(
            f"UPDATE study_timers SET {', '.join(sets)} WHERE tenant_id = $1 AND id = $2 "
            f"RETURNING {_TIMER_COLS}",
            *args,
        )
        assert r is not None
        return _timer(r)

    async def due_timers(self, conn: asyncpg.Connection, limit: int) -> list[tuple[str, str, str]]:
        """(tenant, session, timer) of running timers that reached zero, locked."""
        rows = await conn.fetch(
            "SELECT tenant_id, session_id, id FROM study_timers "
            "WHERE status = 'running' AND ends_at <= clock_timestamp() "
            "ORDER BY ends_at LIMIT $1 FOR UPDATE SKIP LOCKED",
            limit,
        )
        return [(str(r["tenant_id"]), str(r["session_id"]), str(r["id"])) for r in rows]

    async def timer_by_id(
        self, conn: asyncpg.Connection, tenant_id: str, timer_id: str
    ) -> TimerRow | None:
        r = await conn.fetchrow(
            f"SELECT {_TIMER_COLS} FROM study_timers WHERE tenant_id = $1 AND id = $2",
            _u(tenant_id),
            _u(timer_id),
        )
        return _timer(r) if r is not None else None

    async def insert_timer_log(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        participant_id: str | None,
        room_id: str | None,
        user_id: str,
        display_name: str,
        action: str,
        at: datetime,
    ) -> None:
        await conn.execute(
            "INSERT INTO session_logs (tenant_id, session_id, participant_id, breakout_room_id, "
            "user_id, joined_at, left_at, duration_seconds, reason, kind, display_name, detail) "
            "VALUES ($1, $2, $3, $4, $5, $6, $6, 0, NULL, 'timer', $7, $8)",
            _u(tenant_id),
            _u(session_id),
            _ou(participant_id),
            _ou(room_id),
            user_id[:255],
            at,
            display_name[:100],
            action,
        )

    # ------------------------------------------------------------------ studio

    async def insert_scene(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        session_id: str,
        name: str,
        layout: str,
        deck_id: str,
        deck_url: str,
        slide_count: int,
        metadata: Mapping[str, Any],
    ) -> SceneRow:
        r = await conn.fetchrow(
            "INSERT INTO studio_scenes (tenant_id, session_id, name, layout, slide_deck_id, "
            "slide_deck_url, slide_count, metadata) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb) "
            f"RETURNING {_SCENE_COLS}",
            _u(tenant_id),
            _u(session_id),
            name,
            layout,
            deck_id or None,
            deck_url or None,
            slide_count,
            dict(metadata),
        )
        assert r is not None
        return _scene(r)

    async def scene(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        scene_id: str,
        *,
        for_update: bool = False,
    ) -> SceneRow | None:
        r = await conn.fetchrow(
            f"SELECT {_SCENE_COLS} FROM studio_scenes WHERE tenant_id = $1 AND session_id = $2 "
            "AND id = $3" + (" FOR UPDATE" if for_update else ""),
            _u(tenant_id),
            _u(session_id),
            _u(scene_id),
        )
        return _scene(r) if r is not None else None

    async def update_scene(
        self, conn: asyncpg.Connection, tenant_id: str, scene_id: str, fields: Mapping[str, Any]
    ) -> SceneRow:
        sets, args = [], [_u(tenant_id), _u(scene_id)]
        for name, value in fields.items():
            args.append(value)
            cast = "::jsonb" if name == "metadata" else ""
            sets.append(f"{name} = ${len(args)}{cast}")
        sets.append("updated_at = now()")
        r = await conn.fetchrow(
            f"UPDATE studio_scenes SET {', '.join(sets)} WHERE tenant_id = $1 AND id = $2 "
            f"RETURNING {_SCENE_COLS}",
            *args,
        )
        assert r is not None
        return _scene(r)

    async def delete_scene(self, conn: asyncpg.Connection, tenant_id: str, scene_id: str) -> None:
        await conn.execute(
            "DELETE FROM studio_scenes WHERE tenant_id = $1 AND id = $2",
            _u(tenant_id),
            _u(scene_id),
        )

    async def list_scenes(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        session_id: str,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[SceneRow]:
        args: list[Any] = [_u(tenant_id), _u(session_id)]
        cond = ""
        if after is not None:
            args.extend([after[0], _u(after[1])])
            cond = " AND (created_at, id) > ($3, $4)"
        args.append(limit)
        rows = await conn.fetch(
            f"SELECT {_SCENE_COLS} FROM studio_scenes WHERE tenant_id = $1 AND session_id = $2"
            f"{cond} ORDER BY created_at, id LIMIT ${len(args)}",
            *args,
        )
        return [_scene(r) for r in rows]

    async def deactivate_scenes(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str
    ) -> None:
        await conn.execute(
            "UPDATE studio_scenes SET is_active = false, updated_at = now() "
            "WHERE tenant_id = $1 AND session_id = $2 AND is_active",
            _u(tenant_id),
            _u(session_id),
        )

    async def studio(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str
    ) -> StudioRow | None:
        r = await conn.fetchrow(
            "SELECT * FROM studio_state WHERE tenant_id = $1 AND session_id = $2",
            _u(tenant_id),
            _u(session_id),
        )
        return _studio(r) if r is not None else None

    async def save_studio(
        self, conn: asyncpg.Connection, tenant_id: str, state: StudioRow
    ) -> StudioRow:
        r = await conn.fetchrow(
            "INSERT INTO studio_state (session_id, tenant_id, active_scene_id, layout, deck_id, "
            "slide_index, slide_count, slide_url, seq, updated_actor, updated_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, clock_timestamp()) "
            "ON CONFLICT (session_id) DO UPDATE SET active_scene_id = EXCLUDED.active_scene_id, "
            "layout = EXCLUDED.layout, deck_id = EXCLUDED.deck_id, "
            "slide_index = EXCLUDED.slide_index, slide_count = EXCLUDED.slide_count, "
            "slide_url = EXCLUDED.slide_url, seq = EXCLUDED.seq, "
            "updated_actor = EXCLUDED.updated_actor, updated_at = EXCLUDED.updated_at "
            "RETURNING *",
            _u(state.session_id),
            _u(tenant_id),
            _ou(state.active_scene_id),
            state.layout,
            state.deck_id or None,
            state.slide_index,
            state.slide_count,
            state.slide_url or None,
            state.seq,
            dict(state.updated_actor),
        )
        assert r is not None
        return _studio(r)
