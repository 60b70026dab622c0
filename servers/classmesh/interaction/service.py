"""Rules of InteractionService: chat, hand raise, Q&A, polls, whiteboards, study timers and the
teaching studio. No grpc here; SQL lives in store.py.

Mutations run inside the transaction `core.mutations.run_mutation` opens and return a
`Result` (the resource + the events appended); the servicer builds the response.

Who may act where (one place, `_member` + `_enter`): the caller must be an admitted
participant of a usable session (core.sessionguard); a participant acts only in the room
they are in (the main room, or the open breakout room they are assigned to); moderators
(instructors, assistants and admins of a class; admins or holders of `moderate` in a study
room; anyone granted `can_moderate`) act in every room. A tenant admin may read without
joining. Per-user limits (chat, hand raises, whiteboard, questions, votes) are GCRA buckets
on Redis with the seeds' values as configuration defaults.

Lock order inside one transaction: the resource row (question, poll, hand, whiteboard,
timer), then the session row (taken by `append_event`). Mutations whose payload quotes its
own seq (chat, studio) take the session row first and touch no other locked row of the
session before it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import asyncpg
from google.protobuf import json_format
from google.protobuf.message import Message

from classmesh.common.v1 import common_pb2
from classmesh.core.auth import Principal, require
from classmesh.core.config import Config
from classmesh.core.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Validator,
)
from classmesh.core.eventproto import EventBatch, actor_dict
from classmesh.core.events import EventRecord
from classmesh.core.feeds import MAX_SEQ, Scope
from classmesh.core.paging import decode_page_token, encode_page_token, page_size
from classmesh.core.ratelimit import RateLimiter, rate_limit_key
from classmesh.core.sessionguard import SessionRef, check_participant, require_live_session
from classmesh.core.timeutil import from_timestamp, to_timestamp
from classmesh.events.v1 import events_pb2
from classmesh.interaction import convert, rules
from classmesh.interaction.store import (
    InteractionStore,
    ParticipantInfo,
    PollRow,
    QuestionRow,
    SceneRow,
    StudioRow,
    TimerRow,
    WhiteboardTooLarge,
)
from classmesh.interaction.v1 import interaction_pb2, interaction_service_pb2

__all__ = ["Ctx", "FeedPlan", "InteractionService", "Result"]

IX = interaction_pb2
R = interaction_service_pb2
T = TypeVar("T")

MAX_ID = 255
MAX_REASON = 500
PAGE_TOKEN_INVALID = "PAGE_TOKEN_INVALID"
#: Timer lengths (seed 003; API: 1 minute - 4 hours) and the defaults when unset.
TIMER_MIN = timedelta(minutes=1)
TIMER_MAX = timedelta(hours=4)
TIMER_DEFAULTS = {"focus": timedelta(minutes=25), "break": timedelta(minutes=5)}
POLL_MIN = timedelta(seconds=10)
POLL_MAX = timedelta(hours=24)
MAX_OPS = 500
MAX_POINTS = 10_000
COORD = 100_000.0
_COLOR = re.compile(r"^#[0-9A-Fa-f]{6}(?:[0-9A-Fa-f]{2})?$")
_HTTP_URL = re.compile(r"^https?://[^\s<>\"']{1,2040}$", re.IGNORECASE)
SYSTEM_ACTOR = actor_dict(common_pb2.Actor(kind=common_pb2.ACTOR_KIND_SYSTEM))
ANONYMOUS_ACTOR = actor_dict(common_pb2.Actor(kind=common_pb2.ACTOR_KIND_USER))
_SCENE_PATHS = {"name", "layout", "slide_deck_id", "slide_deck_url", "slide_count", "metadata"}
_CHAT_TYPES = {
    IX.CHAT_MESSAGE_TYPE_UNSPECIFIED: "text",
    IX.CHAT_MESSAGE_TYPE_TEXT: "text",
    IX.CHAT_MESSAGE_TYPE_EMOJI: "emoji",
    IX.CHAT_MESSAGE_TYPE_POLL: "poll",
}
_LAYOUT_NAMES = {number: name for name, number in convert.LAYOUTS.items()}
_VOTE_VALUES = {IX.VOTE_UP: 1, IX.VOTE_DOWN: -1, IX.VOTE_NONE: 0}
_QUESTION_SQL = {
    IX.QUESTION_STATUS_OPEN: "(q.deleted_at IS NULL AND q.status = 'approved' AND NOT q.answered)",
    IX.QUESTION_STATUS_ANSWERED: "(q.deleted_at IS NULL AND q.status = 'approved' AND q.answered)",
    IX.QUESTION_STATUS_PENDING_REVIEW: "(q.deleted_at IS NULL AND q.status = 'pending')",
    IX.QUESTION_STATUS_HIDDEN: "(q.deleted_at IS NULL AND q.status = 'rejected')",
    IX.QUESTION_STATUS_DISMISSED: "(q.deleted_at IS NOT NULL)",
}
_PUBLIC_QUESTIONS = (IX.QUESTION_STATUS_OPEN, IX.QUESTION_STATUS_ANSWERED)
_TIMER_MODES = {
    IX.TIMER_MODE_UNSPECIFIED: "focus",
    IX.TIMER_MODE_FOCUS: "focus",
    IX.TIMER_MODE_BREAK: "break",
}


@dataclass
class Result(Generic[T]):
    """What a mutation produced: its value and the events to publish after commit."""

    value: T
    events: list[EventRecord] = field(default_factory=list)


@dataclass(frozen=True)
class Ctx:
    """The caller inside one session (and, once entered, one room)."""

    principal: Principal
    session: SessionRef
    me: ParticipantInfo | None
    moderator: bool
    room: str | None = None

    @property
    def tenant_id(self) -> str:
        return self.principal.tenant_id

    @property
    def session_id(self) -> str:
        return self.session.id

    @property
    def user_id(self) -> str:
        return self.principal.subject

    def actor(self) -> common_pb2.Actor:
        me = self.me
        return convert.actor(
            self.principal.subject,
            me.display_name if me else self.principal.name,
            me.role if me else self.principal.role,
            me.id if me else "",
        )

    def allowed(self, permission: str, default: bool) -> bool:
        """A participant permission (moderators hold them all)."""
        if self.moderator:
            return True
        if self.me is None:
            return False
        value = self.me.permissions.get(permission)
        return default if value is None else bool(value)

    def setting(self, name: str, default: bool) -> bool:
        return rules.setting(self.session.settings, name, default)


@dataclass(frozen=True)
class FeedPlan:
    """What a Subscribe/Connect feed streams and to whom."""

    session_id: str
    after_seq: int
    scope: Scope
    viewer: rules.Viewer


_Events = EventBatch


def _events(ctx: Ctx, request_id: str) -> _Events:
    return _Events(ctx.tenant_id, ctx.session_id, actor_dict(ctx.actor()), request_id)


# ----------------------------------------------------------------------- validation


def _scope(v: Validator, scope: common_pb2.Scope, name: str = "scope") -> tuple[str, str | None]:
    sid = v.require_uuid(f"{name}.session_id", scope.session_id)
    room: str | None = None
    if scope.breakout_room_id:
        room = v.require_uuid(f"{name}.breakout_room_id", scope.breakout_room_id)
    return sid, room


def _text(v: Validator, name: str, value: str, lo: int, hi: int) -> str:
    """`value` trimmed, with a length check on the trimmed text."""
    text = value.strip()
    if lo > 0 and not text:
        v.add(name, "is required")
    elif not lo <= len(text) <= hi:
        v.add(name, f"must be {lo}-{hi} characters after trimming")
    return text


def _clean(name: str, text: str) -> str:
    """`text` neutralised; empty once HTML is gone is invalid."""
    out = rules.neutralise(text)
    if not out:
        raise InvalidArgument([(name, "is empty once HTML and scripts are removed")])
    return out


def _cursor(token: str, arity: int) -> list[Any] | None:
    return decode_page_token(token, arity, reason=PAGE_TOKEN_INVALID)


def _bad_token() -> InvalidArgument:
    return InvalidArgument(
        [("page_token", "not a page token of this list")], reason=PAGE_TOKEN_INVALID
    )


def _time_cursor(token: str) -> tuple[datetime, str] | None:
    values = _cursor(token, 2)
    if values is None:
        return None
    try:
        return datetime.fromisoformat(str(values[0])), str(uuid.UUID(str(values[1])))
    except (ValueError, TypeError) as exc:
        raise _bad_token() from exc


def _timestamp(v: Validator, name: str, ts: Any) -> datetime | None:
    try:
        return from_timestamp(ts)
    except (ValueError, OverflowError):
        v.add(name, "is not a valid timestamp")
        return None


def _finite(value: float, lo: float, hi: float) -> bool:
    return math.isfinite(value) and lo <= value <= hi


def _http_url(v: Validator, name: str, value: str, hi: int) -> None:
    if value and (len(value) > hi or not _HTTP_URL.match(value)):
        v.add(name, f"must be an http(s) URL of at most {hi} characters")


def _json_size(value: Message) -> int | None:
    """Bytes of `value` as compact JSON; None when it has no JSON form (NaN, infinity)."""
    try:
        as_dict = json_format.MessageToDict(value)
        return len(json.dumps(as_dict, separators=(",", ":"), allow_nan=False))
    except (ValueError, TypeError, json_format.Error):
        return None


def _respondent_key(salt: bytes, user_id: str) -> str:
    return hmac.new(salt, user_id.encode(), hashlib.sha256).hexdigest()[:32]


def _moderator(principal: Principal, session: SessionRef, me: ParticipantInfo | None) -> bool:
    if me is not None and me.permissions.get("can_moderate") is True:
        return True
    if session.kind == "study_room":
        return principal.role == "admin" or principal.can("moderate")
    return principal.role in rules.MODERATOR_ROLES


def _forbid(message: str, **metadata: str) -> PermissionDenied:
    return PermissionDenied("PERMISSION_MISSING", message, metadata=metadata)


def _check_element(
    v: Validator, path: str, el: interaction_pb2.WhiteboardElement
) -> dict[str, Any] | None:
    """The element as stored (protobuf JSON), or None after recording its violations."""
    before = len(v.violations)
    v.require_uuid(f"{path}.id", el.id)
    v.require_enum(
        f"{path}.kind",
        el.kind,
        {
            IX.WHITEBOARD_ELEMENT_KIND_STROKE,
            IX.WHITEBOARD_ELEMENT_KIND_SHAPE,
            IX.WHITEBOARD_ELEMENT_KIND_TEXT,
            IX.WHITEBOARD_ELEMENT_KIND_IMAGE,
        },
    )
    v.require_len(f"{path}.tool", el.tool, 0, 32)
    v.require_len(f"{path}.shape", el.shape, 0, 32)
    if el.color and not _COLOR.match(el.color):
        v.add(f"{path}.color", "must be #RRGGBB or #RRGGBBAA")
    if el.stroke_width and not _finite(el.stroke_width, 0.5, 100.0):
        v.add(f"{path}.stroke_width", "must be between 0.5 and 100")
    if not (_finite(el.x, -COORD, COORD) and _finite(el.y, -COORD, COORD)):
        v.add(f"{path}.x", "x and y must be between -100000 and 100000")
    if not (_finite(el.width, 0, 2 * COORD) and _finite(el.height, 0, 2 * COORD)):
        v.add(f"{path}.width", "width and height must be between 0 and 200000")
    points = el.points
    if len(points) > MAX_POINTS:
        v.add(f"{path}.points", f"at most {MAX_POINTS} points")
    else:
        for point in points:
            x, y, pressure = point.x, point.y, point.pressure
            # Comparisons with NaN are False, so NaN fails these too.
            if not (-COORD <= x <= COORD and -COORD <= y <= COORD and 0.0 <= pressure <= 1.0):
                v.add(f"{path}.points", "x and y between -100000 and 100000, pressure 0-1")
                break
    if el.kind == IX.WHITEBOARD_ELEMENT_KIND_IMAGE:
        _http_url(v, f"{path}.text", el.text, 2048)
    elif len(el.text) > 5000:
        v.add(f"{path}.text", "at most 5000 characters")
    if el.HasField("attributes"):
        size = _json_size(el.attributes)
        if size is None or size > 4096:
            v.add(f"{path}.attributes", "at most 4 KB of JSON (no NaN or infinity)")
    if len(v.violations) > before:
        return None
    if el.kind == IX.WHITEBOARD_ELEMENT_KIND_TEXT and el.text:
        el.text = rules.neutralise(el.text)
    return json_format.MessageToDict(el, preserving_proto_field_name=True)


class InteractionService:
    """The rules; every method takes the connection (and transaction) of its caller."""

    def __init__(
        self, config: Config, limiter: RateLimiter, store: InteractionStore | None = None
    ) -> None:
        self.config = config
        self.limiter = limiter
        self.store = store or InteractionStore()

    # =============================================================== who, where

    async def _limit(self, principal: Principal, what: str, per_minute: int, burst: int) -> None:
        decision = await self.limiter.hit(
            rate_limit_key(principal.tenant_id, principal.subject, f"interaction.{what}"),
            rate_per_minute=per_minute,
            burst=max(1, burst),
        )
        if not decision.allowed:
            raise ResourceExhausted(
                "RATE_LIMITED",
                decision.retry_after,
                f"{what} rate limit exceeded; retry in {decision.retry_after:.3f} s",
                metadata={"limit": what, "ratePerMinute": str(per_minute), "burst": str(burst)},
                quota_violations=[
                    (
                        f"{principal.tenant_id}/{principal.subject}",
                        f"{per_minute} {what} per minute",
                    )
                ],
            )

    async def _member(
        self, conn: asyncpg.Connection, principal: Principal, session_id: str, *, write: bool
    ) -> Ctx:
        """The caller in the session, before any room is chosen."""
        require(principal, session_id=session_id)
        session = await require_live_session(conn, principal.tenant_id, session_id)
        me = await self.store.participant(conn, principal.tenant_id, session.id, principal.subject)
        if me is None and principal.role == "admin" and not write:
            # A tenant admin (an LMS backend, a dashboard) reads without joining.
            return Ctx(principal, session, None, moderator=True)
        check_participant(session.id, me.status if me else None)
        return Ctx(principal, session, me, moderator=_moderator(principal, session, me))

    async def _enter(
        self, conn: asyncpg.Connection, ctx: Ctx, room: str | None, *, write: bool
    ) -> Ctx:
        """`ctx` in `room` (None = main room): the room exists (and is open, to write) and
        the caller is in it, unless a moderator."""
        if room is not None:
            status = await self.store.breakout_room_status(
                conn, ctx.tenant_id, ctx.session_id, room
            )
            if status is None:
                raise NotFound("breakout_room", room)
            if write and status != "open":
                raise FailedPrecondition(
                    "BREAKOUT_ROOM_CLOSED",
                    "the breakout room is closed",
                    metadata={"breakoutRoomId": room},
                )
        if not ctx.moderator:
            current = ctx.me.room_id if ctx.me else None
            if current != room:
                where = f"breakout room {current}" if current else "the main room"
                raise _forbid(
                    f"you are in {where}; participants act only in the room they are in",
                    breakoutRoomId=room or "",
                    currentBreakoutRoomId=current or "",
                )
        return replace(ctx, room=room)

    async def _ctx(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        session_id: str,
        room: str | None,
        *,
        write: bool,
    ) -> Ctx:
        ctx = await self._member(conn, principal, session_id, write=write)
        return await self._enter(conn, ctx, room, write=write)

    @staticmethod
    def _require_moderator(ctx: Ctx, what: str) -> None:
        if not ctx.moderator:
            raise _forbid(
                f"only moderators (instructors, assistants) may {what}",
                requiredRoles="admin,assistant,instructor",
            )

    # =============================================================== feeds

    async def plan_feed(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        scope: common_pb2.Scope,
        after_seq: int,
        include_session_events: bool,
    ) -> FeedPlan:
        v = Validator()
        sid, room = _scope(v, scope)
        v.require_range("after_seq", after_seq, 0, MAX_SEQ)
        v.raise_if_any()
        require(principal, session_id=sid, capability="subscribe")
        ctx = await self._ctx(conn, principal, sid, room, write=False)
        announcements = rules.ANNOUNCEMENTS if room is None or include_session_events else None
        return FeedPlan(
            session_id=ctx.session_id,
            after_seq=after_seq,
            scope=Scope(room, frozenset(announcements or ())),
            viewer=rules.Viewer(principal.subject, ctx.moderator),
        )

    # =============================================================== chat

    async def send_chat(
        self, conn: asyncpg.Connection, p: Principal, req: R.SendChatMessageRequest
    ) -> Result[IX.ChatMessage]:
        cfg = self.config
        v = Validator()
        sid, room = _scope(v, req.scope)
        text = _text(v, "text", req.text, 1, cfg.chat_max_length)
        if req.type in (IX.CHAT_MESSAGE_TYPE_SYSTEM, IX.CHAT_MESSAGE_TYPE_BROADCAST):
            v.add("type", "SYSTEM and BROADCAST messages are posted by ClassMesh only")
        else:
            v.require_enum("type", req.type, set(_CHAT_TYPES))
        if req.recipient_user_id:
            v.require_len("recipient_user_id", req.recipient_user_id, 1, MAX_ID)
            v.check(req.recipient_user_id != p.subject, "recipient_user_id", "cannot be yourself")
        v.raise_if_any()
        body = _clean("text", text)
        require(p, session_id=sid, capability="chat")
        await self._limit(p, "chat", cfg.chat_messages_per_minute, cfg.chat_messages_per_minute)
        ctx = await self._ctx(conn, p, sid, room, write=True)
        kind = _CHAT_TYPES[req.type]
        if not ctx.moderator and (
            not ctx.setting("chat_enabled", True)
            or not ctx.allowed("can_chat", True)
            or (ctx.me is not None and ctx.me.chat_muted)
        ):
            raise FailedPrecondition(
                "CHAT_DISABLED",
                "chat is switched off for this session or for you",
                metadata={"sessionId": sid},
            )
        if kind == "poll":
            self._require_moderator(ctx, "post POLL messages")
        if req.recipient_user_id:
            if not ctx.moderator and not ctx.setting("private_chat_enabled", False):
                raise FailedPrecondition(
                    "FEATURE_DISABLED",
                    "private chat is switched off for this session",
                    metadata={"setting": "private_chat_enabled"},
                )
            other = await self.store.participant(conn, ctx.tenant_id, sid, req.recipient_user_id)
            if other is None or other.status not in ("admitted", "disconnected"):
                raise NotFound("participant", req.recipient_user_id)
            if other.room_id != room:
                raise InvalidArgument([("recipient_user_id", "the recipient is in another room")])
        seq = await self.store.reserve_seq(conn, ctx.tenant_id, sid)
        row = await self.store.insert_chat(
            conn,
            message_id=str(uuid.uuid4()),
            tenant_id=ctx.tenant_id,
            session_id=sid,
            room_id=room,
            user_id=p.subject,
            recipient_user_id=req.recipient_user_id,
            message_type=kind,
            body=body,
            seq=seq,
        )
        message = convert.chat_proto(row)
        events = _events(ctx, req.request_id)
        record = await events.add(conn, events_pb2.ChatMessagePosted(message=message), room)
        if record.seq != seq:
            raise RuntimeError(f"chat message seq {seq} != event seq {record.seq}")
        return Result(message, events.records)

    async def list_chat(
        self, conn: asyncpg.Connection, p: Principal, req: R.ListChatMessagesRequest
    ) -> tuple[list[IX.ChatMessage], str]:
        v = Validator()
        sid, room = _scope(v, req.scope)
        size = page_size(req.page_size, default=50, cap=100)
        before = (
            _timestamp(v, "before_time", req.before_time) if req.HasField("before_time") else None
        )
        after = _timestamp(v, "after_time", req.after_time) if req.HasField("after_time") else None
        v.raise_if_any()
        cursor = _cursor(req.page_token, 1)
        before_seq: int | None = None
        if cursor is not None:
            if not isinstance(cursor[0], int) or not 1 <= cursor[0] <= MAX_SEQ:
                raise _bad_token()
            before_seq = cursor[0]
        ctx = await self._ctx(conn, p, sid, room, write=False)
        if req.include_deleted:
            self._require_moderator(ctx, "list deleted messages")
        rows = await self.store.list_chat(
            conn,
            tenant_id=ctx.tenant_id,
            session_id=sid,
            room_id=room,
            viewer=None if ctx.moderator else p.subject,
            include_deleted=req.include_deleted,
            before_seq=before_seq,
            before_time=before,
            after_time=after,
            limit=size + 1,
        )
        page, more = rows[:size], len(rows) > size
        token = encode_page_token(page[-1].seq) if more and page[-1].seq else ""
        return [convert.chat_proto(r) for r in page], token

    async def delete_chat(
        self, conn: asyncpg.Connection, p: Principal, req: R.DeleteChatMessageRequest
    ) -> Result[IX.ChatMessage]:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        mid = v.require_uuid("message_id", req.message_id)
        v.require_len("reason", req.reason, 0, MAX_REASON)
        v.raise_if_any()
        ctx = await self._member(conn, p, sid, write=True)
        self._require_moderator(ctx, "delete chat messages")
        row = await self.store.get_chat(conn, ctx.tenant_id, sid, mid)
        if row is None:
            raise NotFound("chat_message", mid)
        if row.deleted_at is not None:
            return Result(convert.chat_proto(row))
        await self.store.delete_chat(conn, ctx.tenant_id, mid, p.subject)
        if row.seq:
            # Gone from replays too: the log keeps that a message was posted, not its text.
            await self.store.scrub_chat_event(conn, ctx.tenant_id, sid, row.seq)
        row = await self.store.get_chat(conn, ctx.tenant_id, sid, mid)
        assert row is not None
        await self.store.insert_audit(
            conn,
            tenant_id=ctx.tenant_id,
            session_id=sid,
            actor_id=p.subject,
            actor_role=ctx.me.role if ctx.me else p.role,
            action="chat_message_deleted",
            target_type="chat_message",
            target_id=mid,
            reason=req.reason,
            metadata={
                "actorName": (ctx.me.display_name if ctx.me else p.name)[:100],
                "senderId": row.user_id,
            },
            request_id=req.request_id,
        )
        events = _events(ctx, req.request_id)
        await events.add(
            conn,
            events_pb2.ChatMessageDeleted(
                message_id=mid, scope=convert.scope(sid, row.room_id), reason=req.reason
            ),
            row.room_id,
        )
        return Result(convert.chat_proto(row), events.records)

    # =============================================================== hand raise

    async def raise_hand(
        self, conn: asyncpg.Connection, p: Principal, req: R.RaiseHandRequest
    ) -> Result[IX.HandRaise]:
        v = Validator()
        sid, room = _scope(v, req.scope)
        v.raise_if_any()
        per = self.config.hand_raises_per_minute
        await self._limit(p, "hand_raise", per, per)
        ctx = await self._ctx(conn, p, sid, room, write=True)
        if not ctx.allowed("can_raise_hand", True):
            raise _forbid("you may not raise your hand in this session")
        existing = await self.store.active_hand(conn, ctx.tenant_id, sid, p.subject)
        if existing is not None and existing.room_id == room:
            return Result(convert.hand_proto(existing))
        events = _events(ctx, req.request_id)
        if existing is not None:
            # Raised in the room the caller has left: that raise ends here.
            await self.store.lock_hand(conn, ctx.tenant_id, existing.id)
            await self.store.end_hand(
                conn, ctx.tenant_id, existing.id, status="lowered", by=p.subject
            )
            old = await self.store.get_hand(conn, ctx.tenant_id, sid, existing.id)
            assert old is not None
            await events.add(
                conn, events_pb2.HandLowered(hand_raise=convert.hand_proto(old)), old.room_id
            )
        hand_id = await self.store.insert_hand(
            conn, tenant_id=ctx.tenant_id, session_id=sid, room_id=room, user_id=p.subject
        )
        if hand_id is None:
            # A concurrent raise of the same user won: theirs is the active one.
            winner = await self.store.active_hand(conn, ctx.tenant_id, sid, p.subject)
            if winner is None:
                raise Aborted("CONCURRENT_MODIFICATION", "the hand was lowered meanwhile; retry")
            return Result(convert.hand_proto(winner), events.records)
        row = await self.store.get_hand(conn, ctx.tenant_id, sid, hand_id)
        assert row is not None
        hand = convert.hand_proto(row)
        await events.add(conn, events_pb2.HandRaised(hand_raise=hand), room)
        return Result(hand, events.records)

    async def lower_hand(
        self, conn: asyncpg.Connection, p: Principal, req: R.LowerHandRequest
    ) -> Result[IX.HandRaise]:
        v = Validator()
        sid, room = _scope(v, req.scope)
        v.require_len("user_id", req.user_id, 0, MAX_ID)
        v.raise_if_any()
        ctx = await self._ctx(conn, p, sid, room, write=True)
        target = req.user_id or p.subject
        if target != p.subject:
            self._require_moderator(ctx, "dismiss another participant's hand")
        hand = await self.store.active_hand(conn, ctx.tenant_id, sid, target)
        if hand is None or hand.room_id != room:
            raise FailedPrecondition(
                "HAND_NOT_RAISED", f"{target} has no raised hand here", metadata={"userId": target}
            )
        if await self.store.lock_hand(conn, ctx.tenant_id, hand.id) != "raised":
            raise FailedPrecondition("HAND_NOT_RAISED", "the hand was lowered meanwhile")
        await self.store.end_hand(conn, ctx.tenant_id, hand.id, status="lowered", by=p.subject)
        row = await self.store.get_hand(conn, ctx.tenant_id, sid, hand.id)
        assert row is not None
        out = convert.hand_proto(row)
        events = _events(ctx, req.request_id)
        await events.add(conn, events_pb2.HandLowered(hand_raise=out), room)
        return Result(out, events.records)

    async def acknowledge_hand(
        self, conn: asyncpg.Connection, p: Principal, req: R.AcknowledgeHandRequest
    ) -> Result[IX.HandRaise]:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        hid = v.require_uuid("hand_raise_id", req.hand_raise_id)
        v.raise_if_any()
        ctx = await self._member(conn, p, sid, write=True)
        self._require_moderator(ctx, "acknowledge hands")
        hand = await self.store.get_hand(conn, ctx.tenant_id, sid, hid)
        if hand is None:
            raise NotFound("hand_raise", hid)
        if await self.store.lock_hand(conn, ctx.tenant_id, hid) != "raised":
            raise FailedPrecondition(
                "HAND_NOT_RAISED", "the hand is no longer raised", metadata={"handRaiseId": hid}
            )
        await self.store.end_hand(conn, ctx.tenant_id, hid, status="acknowledged", by=p.subject)
        row = await self.store.get_hand(conn, ctx.tenant_id, sid, hid)
        assert row is not None
        out = convert.hand_proto(row)
        events = _events(ctx, req.request_id)
        await events.add(conn, events_pb2.HandAcknowledged(hand_raise=out), row.room_id)
        return Result(out, events.records)

    async def list_hands(
        self, conn: asyncpg.Connection, p: Principal, req: R.ListRaisedHandsRequest
    ) -> tuple[list[IX.HandRaise], str, int]:
        v = Validator()
        sid, room = _scope(v, req.scope)
        size = page_size(req.page_size, default=100, cap=500)
        v.raise_if_any()
        after = _time_cursor(req.page_token)
        ctx = await self._ctx(conn, p, sid, room, write=False)
        rows, active = await self.store.list_hands(
            conn,
            tenant_id=ctx.tenant_id,
            session_id=sid,
            room_id=room,
            include_inactive=req.include_inactive,
            after=after,
            limit=size + 1,
        )
        page, more = rows[:size], len(rows) > size
        token = encode_page_token(page[-1].raised_at.isoformat(), page[-1].id) if more else ""
        return [convert.hand_proto(r) for r in page], token, active

    # =============================================================== Q&A

    @staticmethod
    def _sees_question(ctx: Ctx, row: QuestionRow) -> bool:
        status = convert.question_status(row)
        if ctx.moderator or status in _PUBLIC_QUESTIONS:
            return True
        own = row.user_id == ctx.user_id
        return own and status in (IX.QUESTION_STATUS_PENDING_REVIEW, IX.QUESTION_STATUS_HIDDEN)

    @staticmethod
    def _question(ctx: Ctx, row: QuestionRow) -> IX.Question:
        reveal = ctx.moderator or row.user_id == ctx.user_id
        return convert.question_proto(row, reveal_author=reveal)

    async def _load_question(
        self, conn: asyncpg.Connection, ctx: Ctx, question_id: str, *, lock: bool
    ) -> QuestionRow:
        row = await self.store.get_question(
            conn, ctx.tenant_id, ctx.session_id, question_id, ctx.user_id, for_update=lock
        )
        if row is None or not self._sees_question(ctx, row):
            raise NotFound("question", question_id)
        return row

    async def ask(
        self, conn: asyncpg.Connection, p: Principal, req: R.AskQuestionRequest
    ) -> Result[IX.Question]:
        cfg = self.config
        v = Validator()
        sid, room = _scope(v, req.scope)
        text = _text(v, "text", req.text, 1, 1000)
        v.raise_if_any()
        body = _clean("text", text)
        if rules.count_links(body) > cfg.question_max_links:
            raise InvalidArgument(
                [("text", f"at most {cfg.question_max_links} links per question")]
            )
        await self._limit(p, "question", cfg.questions_per_minute, cfg.questions_per_minute)
        ctx = await self._ctx(conn, p, sid, room, write=True)
        if not ctx.setting("qa_enabled", True):
            raise FailedPrecondition(
                "FEATURE_DISABLED",
                "Q&A is switched off for this session",
                metadata={"setting": "qa_enabled"},
            )
        if not ctx.allowed("can_ask_questions", True):
            raise _forbid("you may not ask questions in this session")
        normalised = rules.normalised_question(body)
        if await self.store.duplicate_question(conn, ctx.tenant_id, sid, p.subject, normalised):
            raise AlreadyExists("ALREADY_EXISTS", "you already asked this question")
        pending = ctx.setting("qa_moderation_required", False) and not ctx.moderator
        qid = await self.store.insert_question(
            conn,
            tenant_id=ctx.tenant_id,
            session_id=sid,
            room_id=room,
            user_id=p.subject,
            anonymous=req.anonymous,
            body=body,
            status="pending" if pending else "approved",
        )
        row = await self.store.get_question(conn, ctx.tenant_id, sid, qid, p.subject)
        assert row is not None
        events = _events(ctx, req.request_id)
        public = convert.question_proto(row, reveal_author=False, with_my_vote=False)
        await events.add(
            conn,
            events_pb2.QuestionAsked(question=public),
            room,
            actor=ANONYMOUS_ACTOR if row.anonymous else None,
        )
        return Result(self._question(ctx, row), events.records)

    async def vote(
        self, conn: asyncpg.Connection, p: Principal, req: R.VoteQuestionRequest
    ) -> Result[IX.Question]:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        qid = v.require_uuid("question_id", req.question_id)
        v.require_enum("vote", req.vote, set(_VOTE_VALUES))
        v.raise_if_any()
        per = self.config.question_votes_per_minute
        await self._limit(p, "question_vote", per, per)
        ctx = await self._member(conn, p, sid, write=True)
        row = await self._load_question(conn, ctx, qid, lock=True)
        ctx = await self._enter(conn, ctx, row.room_id, write=True)
        if convert.question_status(row) != IX.QUESTION_STATUS_OPEN:
            raise FailedPrecondition(
                "INVALID_STATE_TRANSITION",
                "only open questions take votes",
                metadata={"questionId": qid},
            )
        if row.user_id == p.subject:
            raise FailedPrecondition("OWN_QUESTION", "you cannot vote on your own question")
        value = _VOTE_VALUES[req.vote]
        previous = await self.store.set_vote(conn, ctx.tenant_id, qid, p.subject, value)
        if previous == value:
            return Result(self._question(ctx, row))
        row = await self._load_question(conn, ctx, qid, lock=False)
        events = _events(ctx, req.request_id)
        await events.add(
            conn,
            events_pb2.QuestionVoted(
                question_id=qid,
                upvotes=row.upvotes,
                downvotes=row.downvotes,
                score=row.score,
                vote=req.vote,
            ),
            row.room_id,
        )
        return Result(self._question(ctx, row), events.records)

    async def answer(
        self, conn: asyncpg.Connection, p: Principal, req: R.AnswerQuestionRequest
    ) -> Result[IX.Question]:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        qid = v.require_uuid("question_id", req.question_id)
        text = req.text.strip()
        v.check(len(text) <= 5000, "text", "at most 5000 characters")
        v.check(bool(text) or req.answered_live, "text", "is required unless answered_live")
        v.raise_if_any()
        body = rules.neutralise(text) if text else ""
        ctx = await self._member(conn, p, sid, write=True)
        self._require_moderator(ctx, "answer questions")
        row = await self._load_question(conn, ctx, qid, lock=True)
        if convert.question_status(row) not in _PUBLIC_QUESTIONS:
            raise FailedPrecondition(
                "INVALID_STATE_TRANSITION",
                "approve or restore the question before answering it",
                metadata={"questionId": qid},
            )
        now = await self.store.db_now(conn)
        await self.store.update_question(
            conn,
            ctx.tenant_id,
            qid,
            {
                "answered": True,
                "answered_at": now,
                "answered_by": p.subject[:255],
                "answer_text": body or None,
                "answered_live": req.answered_live,
            },
        )
        row = await self._load_question(conn, ctx, qid, lock=False)
        events = _events(ctx, req.request_id)
        await events.add(
            conn,
            events_pb2.QuestionAnswered(
                question=convert.question_proto(row, reveal_author=False, with_my_vote=False)
            ),
            row.room_id,
        )
        return Result(self._question(ctx, row), events.records)

    async def moderate(
        self, conn: asyncpg.Connection, p: Principal, req: R.ModerateQuestionRequest
    ) -> Result[IX.Question]:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        qid = v.require_uuid("question_id", req.question_id)
        action = req.action
        v.require_enum("action", action, set(IX.ModerationAction.values()) - {0})
        v.require_len("reason", req.reason, 0, MAX_REASON)
        v.raise_if_any()
        ctx = await self._member(conn, p, sid, write=True)
        self._require_moderator(ctx, "moderate questions")
        row = await self._load_question(conn, ctx, qid, lock=True)
        status = convert.question_status(row)
        fields: dict[str, Any] = {}
        invalid = False
        if action == IX.MODERATION_ACTION_APPROVE:
            invalid = status in (IX.QUESTION_STATUS_HIDDEN, IX.QUESTION_STATUS_DISMISSED)
            if status == IX.QUESTION_STATUS_PENDING_REVIEW:
                fields = {"status": "approved"}
        elif action == IX.MODERATION_ACTION_HIDE:
            invalid = status == IX.QUESTION_STATUS_DISMISSED
            if status != IX.QUESTION_STATUS_HIDDEN:
                fields = {"status": "rejected", "pinned": False}
        elif action == IX.MODERATION_ACTION_PIN:
            invalid = status not in _PUBLIC_QUESTIONS
            if not row.pinned:
                fields = {"pinned": True}
        elif action == IX.MODERATION_ACTION_UNPIN:
            if row.pinned:
                fields = {"pinned": False}
        elif action == IX.MODERATION_ACTION_DISMISS:
            if status != IX.QUESTION_STATUS_DISMISSED:
                fields = {"deleted_at": await self.store.db_now(conn), "pinned": False}
        elif action == IX.MODERATION_ACTION_RESTORE:
            invalid = status not in (IX.QUESTION_STATUS_HIDDEN, IX.QUESTION_STATUS_DISMISSED)
            fields = {"deleted_at": None, "status": "approved"}
        if invalid:
            raise FailedPrecondition(
                "INVALID_STATE_TRANSITION",
                f"{IX.ModerationAction.Name(action)} does not apply to a "
                f"{IX.QuestionStatus.Name(status)} question",
                metadata={"questionId": qid},
            )
        if not fields:
            return Result(self._question(ctx, row))
        fields["moderated_by"] = p.subject[:255]
        fields["moderated_at"] = await self.store.db_now(conn)
        await self.store.update_question(conn, ctx.tenant_id, qid, fields)
        row = await self._load_question(conn, ctx, qid, lock=False)
        if action in (IX.MODERATION_ACTION_HIDE, IX.MODERATION_ACTION_DISMISS):
            await self.store.insert_audit(
                conn,
                tenant_id=ctx.tenant_id,
                session_id=sid,
                actor_id=p.subject,
                actor_role=ctx.me.role if ctx.me else p.role,
                action="question_moderated",
                target_type="question",
                target_id=qid,
                reason=req.reason,
                metadata={
                    "actorName": (ctx.me.display_name if ctx.me else p.name)[:100],
                    "action": IX.ModerationAction.Name(action).removeprefix("MODERATION_ACTION_"),
                    "authorId": row.user_id,
                },
                request_id=req.request_id,
            )
        events = _events(ctx, req.request_id)
        await events.add(
            conn,
            events_pb2.QuestionModerated(
                question=convert.question_proto(row, reveal_author=False, with_my_vote=False),
                action=action,
                reason=req.reason,
            ),
            row.room_id,
        )
        return Result(self._question(ctx, row), events.records)

    async def get_question(
        self, conn: asyncpg.Connection, p: Principal, req: R.GetQuestionRequest
    ) -> IX.Question:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        qid = v.require_uuid("question_id", req.question_id)
        v.raise_if_any()
        ctx = await self._member(conn, p, sid, write=False)
        row = await self._load_question(conn, ctx, qid, lock=False)
        ctx = await self._enter(conn, ctx, row.room_id, write=False)
        return self._question(ctx, row)

    async def list_questions(
        self, conn: asyncpg.Connection, p: Principal, req: R.ListQuestionsRequest
    ) -> tuple[list[IX.Question], str, int]:
        v = Validator()
        sid, room = _scope(v, req.scope)
        size = page_size(req.page_size, default=50, cap=100)
        known = set(IX.QuestionStatus.values())
        if len(req.statuses) > len(known) or not set(req.statuses) <= known:
            v.add("statuses", "must be QuestionStatus values, each at most once")
        v.require_enum("order", req.order, set(R.QuestionOrder.values()))
        v.raise_if_any()
        newest = req.order == R.QUESTION_ORDER_NEWEST
        values = _cursor(req.page_token, 3 if newest else 5)
        after: list[Any] | None = None
        if values is not None:
            try:
                if values[0] != ("n" if newest else "s"):
                    raise ValueError("cursor of another order")
                after = [
                    *(int(x) for x in values[1:-2]),
                    datetime.fromisoformat(str(values[-2])),
                    str(uuid.UUID(str(values[-1]))),
                ]
            except (ValueError, TypeError) as exc:
                raise _bad_token() from exc
        ctx = await self._ctx(conn, p, sid, room, write=False)
        wanted = set(req.statuses) - {IX.QUESTION_STATUS_UNSPECIFIED}
        if not wanted:
            wanted = set(_QUESTION_SQL) if ctx.moderator else set(_PUBLIC_QUESTIONS)
        if not wanted <= set(_PUBLIC_QUESTIONS):
            self._require_moderator(ctx, "list pending, hidden or dismissed questions")
        where = "(" + " OR ".join(_QUESTION_SQL[s] for s in sorted(wanted)) + ")"
        rows, total = await self.store.list_questions(
            conn,
            tenant_id=ctx.tenant_id,
            session_id=sid,
            room_id=room,
            viewer=p.subject,
            where_status=where,
            newest=newest,
            after=after,
            limit=size + 1,
        )
        page, more = rows[:size], len(rows) > size
        token = ""
        if more:
            last = page[-1]
            if newest:
                token = encode_page_token("n", last.created_at.isoformat(), last.id)
            else:
                token = encode_page_token(
                    "s", int(not last.pinned), -last.score, last.created_at.isoformat(), last.id
                )
        return [self._question(ctx, r) for r in page], token, total

    # =============================================================== polls

    def _results_visible(self, ctx: Ctx, row: PollRow) -> bool:
        return ctx.moderator or row.show_results_live or row.status == "closed"

    async def _results(
        self, conn: asyncpg.Connection, tenant_id: str, row: PollRow
    ) -> IX.PollResults:
        counts, respondents = await self.store.poll_counts(conn, tenant_id, row.id)
        return convert.results_proto(row, counts, respondents)

    async def _load_poll(
        self, conn: asyncpg.Connection, ctx: Ctx, poll_id: str, *, lock: bool
    ) -> PollRow:
        row = await self.store.get_poll(
            conn, ctx.tenant_id, ctx.session_id, poll_id, ctx.user_id, for_update=lock
        )
        if row is None:
            raise NotFound("poll", poll_id)
        return row

    async def create_poll(
        self, conn: asyncpg.Connection, p: Principal, req: R.CreatePollRequest
    ) -> Result[IX.Poll]:
        v = Validator()
        sid, room = _scope(v, req.scope)
        question = _text(v, "question", req.question, 1, 500)
        if not 2 <= len(req.options) <= 10:
            v.add("options", "must have 2-10 options")
        options = [_text(v, f"options[{i}]", o, 1, 200) for i, o in enumerate(req.options[:10])]
        v.require_enum("kind", req.kind, set(IX.PollKind.values()))
        v.require_range("max_selections", req.max_selections, 0, 10)
        multiple = req.kind == IX.POLL_KIND_MULTIPLE_CHOICE
        if multiple and req.max_selections > len(req.options):
            v.add("max_selections", "cannot exceed the number of options")
        duration_s: float | None = None
        if req.HasField("duration"):
            try:
                duration = req.duration.ToTimedelta()
            except (ValueError, OverflowError):
                duration = timedelta(0)
            if not POLL_MIN <= duration <= POLL_MAX:
                v.add("duration", "must be between 10 seconds and 24 hours")
            duration_s = duration.total_seconds()
        v.raise_if_any()
        question = _clean("question", question)
        options = [_clean(f"options[{i}]", o) for i, o in enumerate(options)]
        ctx = await self._ctx(conn, p, sid, room, write=True)
        self._require_moderator(ctx, "create polls")
        poll_id = await self.store.insert_poll(
            conn,
            tenant_id=ctx.tenant_id,
            session_id=sid,
            room_id=room,
            question=question,
            options=options,
            allow_multiple=multiple,
            max_selections=req.max_selections if multiple else 0,
            anonymous=req.anonymous,
            show_results_live=req.show_results_live,
            created_by=p.subject,
            duration_s=duration_s,
        )
        row = await self._load_poll(conn, ctx, poll_id, lock=False)
        poll = convert.poll_proto(row, with_selection=False)
        events = _events(ctx, req.request_id)
        await events.add(conn, events_pb2.PollCreated(poll=poll), room)
        return Result(poll, events.records)

    async def respond(
        self, conn: asyncpg.Connection, p: Principal, req: R.RespondToPollRequest
    ) -> Result[tuple[IX.Poll, IX.PollResults | None]]:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        pid = v.require_uuid("poll_id", req.poll_id)
        v.raise_if_any()
        picks = list(req.option_indexes)
        if (
            not 1 <= len(picks) <= 10
            or len(set(picks)) != len(picks)
            or not all(0 <= i <= 9 for i in picks)
        ):
            raise InvalidArgument(
                [("option_indexes", "1-10 distinct option indexes, each 0-9")],
                reason="POLL_OPTION_INVALID",
            )
        ctx = await self._member(conn, p, sid, write=True)
        row = await self._load_poll(conn, ctx, pid, lock=True)
        ctx = await self._enter(conn, ctx, row.room_id, write=True)
        if not ctx.allowed("can_respond_to_polls", True):
            raise _forbid("you may not respond to polls in this session")
        now = await self.store.db_now(conn)
        if row.status == "closed" or (row.closes_at is not None and row.closes_at <= now):
            raise FailedPrecondition(
                "POLL_CLOSED", "the poll is closed; no more responses", metadata={"pollId": pid}
            )
        limit = len(row.options)
        most = (row.max_selections or limit) if row.allow_multiple else 1
        if any(i >= limit for i in picks) or len(picks) > most:
            raise InvalidArgument(
                [
                    (
                        "option_indexes",
                        f"pick {'1' if most == 1 else f'1-{most}'} of the options 0-{limit - 1}",
                    )
                ],
                reason="POLL_OPTION_INVALID",
            )
        picks.sort()
        previous = await self.store.set_response(conn, ctx.tenant_id, pid, p.subject, picks)
        row = replace(row, my_selection=picks)
        results = await self._results(conn, ctx.tenant_id, row)
        events = _events(ctx, req.request_id)
        if previous != picks:
            await events.add(
                conn,
                events_pb2.PollResultsChanged(
                    poll_id=pid,
                    results=results,
                    respondent_key=_respondent_key(row.respondent_salt, p.subject),
                    option_indexes=[] if row.anonymous else picks,
                    show_results_live=row.show_results_live,
                ),
                row.room_id,
                actor=ANONYMOUS_ACTOR if row.anonymous else None,
            )
        visible = results if self._results_visible(ctx, row) else None
        return Result((convert.poll_proto(row), visible), events.records)

    async def _close_poll(
        self,
        conn: asyncpg.Connection,
        tenant_id: str,
        row: PollRow,
        events: _Events,
    ) -> tuple[PollRow, IX.PollResults]:
        await self.store.close_poll(conn, tenant_id, row.id)
        closed = await self.store.get_poll(
            conn, tenant_id, row.session_id, row.id, "", for_update=False
        )
        assert closed is not None
        results = await self._results(conn, tenant_id, closed)
        await events.add(
            conn,
            events_pb2.PollClosed(
                poll=convert.poll_proto(closed, with_selection=False), results=results
            ),
            closed.room_id,
        )
        return replace(closed, my_selection=row.my_selection), results

    async def close_poll(
        self, conn: asyncpg.Connection, p: Principal, req: R.ClosePollRequest
    ) -> Result[tuple[IX.Poll, IX.PollResults]]:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        pid = v.require_uuid("poll_id", req.poll_id)
        v.raise_if_any()
        ctx = await self._member(conn, p, sid, write=True)
        self._require_moderator(ctx, "close polls")
        row = await self._load_poll(conn, ctx, pid, lock=True)
        if row.status == "closed":
            return Result((convert.poll_proto(row), await self._results(conn, ctx.tenant_id, row)))
        events = _events(ctx, req.request_id)
        closed, results = await self._close_poll(conn, ctx.tenant_id, row, events)
        return Result((convert.poll_proto(closed), results), events.records)

    async def close_due_polls(
        self, conn: asyncpg.Connection, limit: int = 100
    ) -> list[EventRecord]:
        """Close open polls whose time is up (the sweeper; system actor)."""
        out: list[EventRecord] = []
        for tenant_id, session_id, poll_id in await self.store.due_polls(conn, limit):
            row = await self.store.get_poll(conn, tenant_id, session_id, poll_id, "")
            if row is None:
                continue
            events = _Events(tenant_id, session_id, SYSTEM_ACTOR, None)
            await self._close_poll(conn, tenant_id, row, events)
            out.extend(events.records)
        return out

    async def get_poll(
        self, conn: asyncpg.Connection, p: Principal, req: R.GetPollRequest
    ) -> IX.Poll:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        pid = v.require_uuid("poll_id", req.poll_id)
        v.raise_if_any()
        ctx = await self._member(conn, p, sid, write=False)
        row = await self._load_poll(conn, ctx, pid, lock=False)
        await self._enter(conn, ctx, row.room_id, write=False)
        return convert.poll_proto(row)

    async def poll_results(
        self, conn: asyncpg.Connection, p: Principal, req: R.GetPollResultsRequest
    ) -> IX.PollResults:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        pid = v.require_uuid("poll_id", req.poll_id)
        v.raise_if_any()
        ctx = await self._member(conn, p, sid, write=False)
        row = await self._load_poll(conn, ctx, pid, lock=False)
        ctx = await self._enter(conn, ctx, row.room_id, write=False)
        if not self._results_visible(ctx, row):
            raise FailedPrecondition(
                "FAILED_PRECONDITION",
                "this poll shows its results when it closes",
                metadata={"pollId": pid},
            )
        if req.include_respondents:
            self._require_moderator(ctx, "see who answered what")
        results = await self._results(conn, ctx.tenant_id, row)
        if req.include_respondents and not row.anonymous:
            for r in await self.store.poll_respondents(conn, ctx.tenant_id, pid):
                item = results.respondents.add(
                    user_id=r["user_id"],
                    display_name=r["display_name"] or r["user_id"],
                    option_indexes=list(r["selected_options"]),
                )
                item.respond_time.CopyFrom(to_timestamp(r["updated_at"]))
        return results

    async def list_polls(
        self, conn: asyncpg.Connection, p: Principal, req: R.ListPollsRequest
    ) -> tuple[list[IX.Poll], str]:
        v = Validator()
        sid, room = _scope(v, req.scope)
        size = page_size(req.page_size, default=50, cap=100)
        v.require_enum("status", req.status, set(IX.PollStatus.values()))
        v.raise_if_any()
        after = _time_cursor(req.page_token)
        ctx = await self._ctx(conn, p, sid, room, write=False)
        status = {IX.POLL_STATUS_OPEN: "open", IX.POLL_STATUS_CLOSED: "closed"}.get(req.status)
        rows = await self.store.list_polls(
            conn,
            tenant_id=ctx.tenant_id,
            session_id=sid,
            room_id=room,
            viewer=p.subject,
            status=status,
            after=after,
            limit=size + 1,
        )
        page, more = rows[:size], len(rows) > size
        token = encode_page_token(page[-1].created_at.isoformat(), page[-1].id) if more else ""
        return [convert.poll_proto(r) for r in page], token

    # =============================================================== whiteboard

    async def get_whiteboard(
        self, conn: asyncpg.Connection, p: Principal, req: R.GetWhiteboardRequest
    ) -> tuple[IX.Whiteboard, int]:
        """Snapshot and the session seq it reflects; run in one REPEATABLE READ snapshot."""
        v = Validator()
        sid, room = _scope(v, req.scope)
        v.raise_if_any()
        ctx = await self._ctx(conn, p, sid, room, write=False)
        row = await self.store.whiteboard(conn, ctx.tenant_id, sid, room)
        elements = (
            await self.store.whiteboard_elements(conn, ctx.tenant_id, row.id) if row else None
        )
        seq = await self.store.last_seq(conn, ctx.tenant_id, sid)
        return convert.whiteboard_proto(sid, room, row, elements), seq

    def _may_draw(self, ctx: Ctx) -> bool:
        return ctx.allowed("can_draw", ctx.setting("students_can_draw", False))

    async def update_whiteboard(
        self, conn: asyncpg.Connection, p: Principal, req: R.UpdateWhiteboardRequest
    ) -> Result[tuple[int, int]]:
        cfg = self.config
        v = Validator()
        sid, room = _scope(v, req.scope)
        v.require_range("base_version", req.base_version, 0, MAX_SEQ)
        if not 1 <= len(req.ops) <= MAX_OPS:
            v.add("ops", f"must have 1-{MAX_OPS} ops")
        ops: list[tuple[str, str, dict[str, Any] | None]] = []
        sent = list(req.ops[:MAX_OPS])
        for i, op in enumerate(sent):
            which = op.WhichOneof("op")
            if which in ("add", "update"):
                element = getattr(op, which)
                element.author_user_id = p.subject
                stored = _check_element(v, f"ops[{i}].{which}", element)
                ops.append((which, element.id, stored))
            elif which == "remove_element_id":
                eid = v.require_uuid(f"ops[{i}].remove_element_id", op.remove_element_id)
                ops.append(("remove", eid, None))
            else:
                v.add(f"ops[{i}]", "one of add, update, remove_element_id is required")
            if len(v.violations) >= 20:
                break
        v.raise_if_any()
        per_s = cfg.whiteboard_updates_per_second
        await self._limit(p, "whiteboard_update", per_s * 60, per_s)
        ctx = await self._ctx(conn, p, sid, room, write=True)
        if not self._may_draw(ctx):
            raise _forbid("you may not draw on this whiteboard")
        board = await self.store.whiteboard(conn, ctx.tenant_id, sid, room, for_update=True)
        assert board is not None
        if req.base_version > board.version:
            raise InvalidArgument(
                [("base_version", f"is ahead of the whiteboard's version {board.version}")]
            )
        marks = await self.store.element_marks(
            conn, ctx.tenant_id, board.id, [eid for _, eid, _ in ops]
        )
        version = board.version + 1
        present = set(marks)
        state: dict[str, dict[str, Any] | None] = {}

        def conflict(eid: str) -> Aborted:
            return Aborted(
                "WHITEBOARD_VERSION_CONFLICT",
                f"element {eid} changed after version {req.base_version}; re-read the board",
                metadata={"elementId": eid, "version": str(board.version)},
            )

        for i, (kind, eid, stored) in enumerate(ops):
            if eid in marks and marks[eid][0] > req.base_version:
                raise conflict(eid)
            if kind == "add":
                if eid in present:
                    raise AlreadyExists(
                        "ALREADY_EXISTS", f"element {eid} already exists; update it instead"
                    )
                assert stored is not None
                state[eid] = {**stored, "_v": version, "_o": version * 1000 + i}
                present.add(eid)
            elif kind == "update":
                if eid not in present:
                    if req.base_version < board.version:
                        raise conflict(eid)
                    raise NotFound("whiteboard_element", eid)
                assert stored is not None
                previous = state.get(eid)
                order = previous["_o"] if previous else marks[eid][1]
                state[eid] = {**stored, "_v": version, "_o": order}
            else:
                present.discard(eid)
                state[eid] = None
        upserts = {eid: el for eid, el in state.items() if el is not None}
        removed = [eid for eid, el in state.items() if el is None and eid in marks]
        too_large = InvalidArgument(
            [("ops", f"the whiteboard would exceed {cfg.whiteboard_max_bytes} bytes")],
            reason="WHITEBOARD_TOO_LARGE",
            metadata={"maxBytes": str(cfg.whiteboard_max_bytes)},
        )
        try:
            new_version, size = await self.store.apply_elements(
                conn,
                tenant_id=ctx.tenant_id,
                board_id=board.id,
                removed=removed,
                upserts=upserts,
                updated_by=p.subject,
                actor=actor_dict(ctx.actor()),
            )
        except WhiteboardTooLarge:
            raise too_large from None
        if size > cfg.whiteboard_max_bytes:
            raise too_large
        events = _events(ctx, req.request_id)
        await events.add(
            conn,
            events_pb2.WhiteboardUpdated(
                scope=convert.scope(sid, room),
                base_version=req.base_version,
                version=new_version,
                ops=sent,
            ),
            room,
        )
        return Result((new_version, size), events.records)

    async def clear_whiteboard(
        self, conn: asyncpg.Connection, p: Principal, req: R.ClearWhiteboardRequest
    ) -> Result[IX.Whiteboard]:
        v = Validator()
        sid, room = _scope(v, req.scope)
        v.raise_if_any()
        ctx = await self._ctx(conn, p, sid, room, write=True)
        if not ctx.moderator and not (
            ctx.setting("students_can_draw", False) and self._may_draw(ctx)
        ):
            raise _forbid("only moderators may clear this whiteboard")
        board = await self.store.whiteboard(conn, ctx.tenant_id, sid, room, for_update=True)
        assert board is not None
        await self.store.clear_whiteboard(
            conn, ctx.tenant_id, board.id, p.subject, actor_dict(ctx.actor())
        )
        board = await self.store.whiteboard(conn, ctx.tenant_id, sid, room)
        assert board is not None
        events = _events(ctx, req.request_id)
        await events.add(
            conn,
            events_pb2.WhiteboardCleared(scope=convert.scope(sid, room), version=board.version),
            room,
        )
        return Result(convert.whiteboard_proto(sid, room, board), events.records)

    # =============================================================== timers

    async def _timer_ctx(
        self, conn: asyncpg.Connection, p: Principal, scope: common_pb2.Scope
    ) -> tuple[Ctx, TimerRow]:
        v = Validator()
        sid, room = _scope(v, scope)
        v.raise_if_any()
        ctx = await self._ctx(conn, p, sid, room, write=True)
        # Study rooms share the timer among peers (seed 003); in a class it is the teacher's.
        if ctx.session.kind != "study_room":
            self._require_moderator(ctx, "run the timer of a class")
        timer = await self.store.timer(conn, ctx.tenant_id, sid, room, for_update=True)
        assert timer is not None
        return ctx, timer

    async def _timer_event(
        self,
        conn: asyncpg.Connection,
        ctx: Ctx,
        timer: TimerRow,
        fields: dict[str, Any],
        action: str,
        request_id: str,
    ) -> Result[IX.StudyTimer]:
        now: datetime = fields["updated_at"]
        actor = ctx.actor()
        fields["updated_actor"] = actor_dict(actor)
        fields["updated_by"] = ctx.user_id[:255]
        if "elapsed_ms" in fields:
            fields["elapsed_seconds"] = int(fields["elapsed_ms"]) // 1000
        row = await self.store.update_timer(conn, ctx.tenant_id, timer.id, fields)
        out = convert.timer_proto(ctx.session_id, ctx.room, row)
        payload: Message
        if action == "started":
            payload = events_pb2.TimerStarted(timer=out)
        elif action == "paused":
            payload = events_pb2.TimerPaused(timer=out)
        elif action == "resumed":
            payload = events_pb2.TimerResumed(timer=out)
        elif action == "completed":
            payload = events_pb2.TimerCompleted(timer=out, elapsed=False)
        else:
            payload = events_pb2.TimerReset(timer=out)
        events = _events(ctx, request_id)
        await events.add(conn, payload, ctx.room)
        await self.store.insert_timer_log(
            conn,
            tenant_id=ctx.tenant_id,
            session_id=ctx.session_id,
            participant_id=ctx.me.id if ctx.me else None,
            room_id=ctx.room,
            user_id=ctx.user_id,
            display_name=actor.display_name,
            action=action,
            at=now,
        )
        return Result(out, events.records)

    @staticmethod
    def _invalid_timer(timer: TimerRow, action: str) -> FailedPrecondition:
        return FailedPrecondition(
            "TIMER_STATE_INVALID",
            f"cannot {action} a timer that is {timer.status}",
            metadata={"status": timer.status.upper()},
        )

    async def start_timer(
        self, conn: asyncpg.Connection, p: Principal, req: R.StartTimerRequest
    ) -> Result[IX.StudyTimer]:
        v = Validator()
        v.require_enum("mode", req.mode, set(_TIMER_MODES))
        mode = _TIMER_MODES.get(req.mode, "focus")
        duration = TIMER_DEFAULTS[mode]
        if req.HasField("duration"):
            try:
                duration = req.duration.ToTimedelta()
            except (ValueError, OverflowError):
                duration = timedelta(0)
            if not TIMER_MIN <= duration <= TIMER_MAX:
                v.add("duration", "must be between 1 minute and 4 hours")
        v.raise_if_any()
        ctx, timer = await self._timer_ctx(conn, p, req.scope)
        if timer.status in ("running", "paused"):
            raise self._invalid_timer(timer, "start")
        now = await self.store.db_now(conn)
        seconds = int(duration.total_seconds())
        fields = {
            "status": "running",
            "mode": mode,
            "duration_seconds": seconds,
            "elapsed_ms": 0,
            "started_at": now,
            "paused_at": None,
            "completed_at": None,
            "ends_at": now + timedelta(seconds=seconds),
            "updated_at": now,
        }
        return await self._timer_event(conn, ctx, timer, fields, "started", req.request_id)

    async def pause_timer(
        self, conn: asyncpg.Connection, p: Principal, req: R.PauseTimerRequest
    ) -> Result[IX.StudyTimer]:
        ctx, timer = await self._timer_ctx(conn, p, req.scope)
        if timer.status != "running" or timer.started_at is None:
            raise self._invalid_timer(timer, "pause")
        now = await self.store.db_now(conn)
        run = int((now - timer.started_at) / timedelta(milliseconds=1))
        duration_ms = (timer.duration_seconds or 0) * 1000
        fields = {
            "status": "paused",
            "elapsed_ms": min(duration_ms, timer.elapsed_ms + max(0, run)),
            "paused_at": now,
            "ends_at": None,
            "updated_at": now,
        }
        return await self._timer_event(conn, ctx, timer, fields, "paused", req.request_id)

    async def resume_timer(
        self, conn: asyncpg.Connection, p: Principal, req: R.ResumeTimerRequest
    ) -> Result[IX.StudyTimer]:
        ctx, timer = await self._timer_ctx(conn, p, req.scope)
        if timer.status != "paused":
            raise self._invalid_timer(timer, "resume")
        now = await self.store.db_now(conn)
        left = max(0, (timer.duration_seconds or 0) * 1000 - timer.elapsed_ms)
        fields = {
            "status": "running",
            "started_at": now,
            "paused_at": None,
            "ends_at": now + timedelta(milliseconds=left),
            "updated_at": now,
        }
        return await self._timer_event(conn, ctx, timer, fields, "resumed", req.request_id)

    async def complete_timer(
        self, conn: asyncpg.Connection, p: Principal, req: R.CompleteTimerRequest
    ) -> Result[IX.StudyTimer]:
        ctx, timer = await self._timer_ctx(conn, p, req.scope)
        if timer.status not in ("running", "paused"):
            raise self._invalid_timer(timer, "complete")
        now = await self.store.db_now(conn)
        elapsed = timer.elapsed_ms
        if timer.status == "running" and timer.started_at is not None:
            elapsed += max(0, int((now - timer.started_at) / timedelta(milliseconds=1)))
        fields = {
            "status": "completed",
            "elapsed_ms": min(elapsed, (timer.duration_seconds or 0) * 1000),
            "paused_at": None,
            "ends_at": None,
            "completed_at": now,
            "completed_focus_count": timer.completed_focus_count + (timer.mode == "focus"),
            "updated_at": now,
        }
        return await self._timer_event(conn, ctx, timer, fields, "completed", req.request_id)

    async def reset_timer(
        self, conn: asyncpg.Connection, p: Principal, req: R.ResetTimerRequest
    ) -> Result[IX.StudyTimer]:
        ctx, timer = await self._timer_ctx(conn, p, req.scope)
        now = await self.store.db_now(conn)
        fields = {
            "status": "idle",
            "elapsed_ms": 0,
            "started_at": None,
            "paused_at": None,
            "completed_at": None,
            "ends_at": None,
            "updated_at": now,
        }
        return await self._timer_event(conn, ctx, timer, fields, "reset", req.request_id)

    async def get_timer(
        self, conn: asyncpg.Connection, p: Principal, req: R.GetTimerRequest
    ) -> IX.StudyTimer:
        v = Validator()
        sid, room = _scope(v, req.scope)
        v.raise_if_any()
        ctx = await self._ctx(conn, p, sid, room, write=False)
        row = await self.store.timer(conn, ctx.tenant_id, sid, room)
        return convert.timer_proto(sid, room, row)

    async def complete_due_timers(
        self, conn: asyncpg.Connection, limit: int = 100
    ) -> list[EventRecord]:
        """Complete running timers that reached zero (the sweeper; system actor)."""
        out: list[EventRecord] = []
        for tenant_id, session_id, timer_id in await self.store.due_timers(conn, limit):
            timer = await self.store.timer_by_id(conn, tenant_id, timer_id)
            if timer is None or timer.status != "running" or timer.ends_at is None:
                continue
            now = timer.ends_at
            fields = {
                "status": "completed",
                "elapsed_ms": (timer.duration_seconds or 0) * 1000,
                "elapsed_seconds": timer.duration_seconds or 0,
                "ends_at": None,
                "completed_at": now,
                "completed_focus_count": timer.completed_focus_count + (timer.mode == "focus"),
                "updated_at": now,
                "updated_actor": SYSTEM_ACTOR,
                "updated_by": "system",
            }
            row = await self.store.update_timer(conn, tenant_id, timer_id, fields)
            events = _Events(tenant_id, session_id, SYSTEM_ACTOR, None)
            await events.add(
                conn,
                events_pb2.TimerCompleted(
                    timer=convert.timer_proto(session_id, row.room_id, row), elapsed=True
                ),
                row.room_id,
            )
            await self.store.insert_timer_log(
                conn,
                tenant_id=tenant_id,
                session_id=session_id,
                participant_id=None,
                room_id=row.room_id,
                user_id="system",
                display_name="ClassMesh",
                action="completed",
                at=now,
            )
            out.extend(events.records)
        return out

    # =============================================================== studio

    async def _presenter(
        self, conn: asyncpg.Connection, p: Principal, session_id: str
    ) -> tuple[Ctx, int]:
        """The caller as a presenter of the session, and the seq its change will get."""
        ctx = await self._ctx(conn, p, session_id, None, write=True)
        if not ctx.allowed("can_present", False):
            raise _forbid("only presenters (instructors, assistants) may change the studio")
        seq = await self.store.reserve_seq(conn, ctx.tenant_id, ctx.session_id)
        return ctx, seq

    @staticmethod
    def _scene_fields(
        v: Validator, scene: interaction_pb2.Scene, paths: Sequence[str]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "name" in paths:
            out["name"] = _text(v, "scene.name", scene.name, 1, 100)
        if "layout" in paths:
            if scene.layout == IX.SCENE_LAYOUT_UNSPECIFIED:
                out["layout"] = "speaker"
            elif scene.layout in _LAYOUT_NAMES:
                out["layout"] = _LAYOUT_NAMES[scene.layout]
            else:
                v.add("scene.layout", "is not a SceneLayout")
        if "slide_deck_id" in paths:
            v.require_len("scene.slide_deck_id", scene.slide_deck_id, 0, 128)
            out["slide_deck_id"] = scene.slide_deck_id or None
        if "slide_deck_url" in paths:
            _http_url(v, "scene.slide_deck_url", scene.slide_deck_url, 2048)
            out["slide_deck_url"] = scene.slide_deck_url or None
        if "slide_count" in paths:
            v.require_range("scene.slide_count", scene.slide_count, 0, 10_000)
            out["slide_count"] = scene.slide_count
        if "metadata" in paths:
            size = _json_size(scene.metadata)
            if size is None or size > 16_384:
                v.add("scene.metadata", "at most 16 KB of JSON (no NaN or infinity)")
                out["metadata"] = {}
            else:
                out["metadata"] = json_format.MessageToDict(scene.metadata)
        return out

    async def create_scene(
        self, conn: asyncpg.Connection, p: Principal, req: R.CreateSceneRequest
    ) -> Result[IX.Scene]:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        fields = self._scene_fields(
            v,
            IX.Scene(
                name=req.name,
                layout=req.layout,
                slide_deck_id=req.slide_deck_id,
                slide_deck_url=req.slide_deck_url,
                slide_count=req.slide_count,
                metadata=req.metadata,
            ),
            list(_SCENE_PATHS),
        )
        v.raise_if_any()
        ctx, _ = await self._presenter(conn, p, sid)
        row = await self.store.insert_scene(
            conn,
            tenant_id=ctx.tenant_id,
            session_id=sid,
            name=_clean("name", fields["name"]),
            layout=fields["layout"],
            deck_id=fields["slide_deck_id"] or "",
            deck_url=fields["slide_deck_url"] or "",
            slide_count=fields["slide_count"],
            metadata=fields["metadata"],
        )
        scene = convert.scene_proto(row)
        events = _events(ctx, req.request_id)
        await events.add(conn, events_pb2.SceneCreated(scene=scene), None)
        return Result(scene, events.records)

    async def _scene(self, conn: asyncpg.Connection, ctx: Ctx, scene_id: str) -> SceneRow:
        row = await self.store.scene(conn, ctx.tenant_id, ctx.session_id, scene_id, for_update=True)
        if row is None:
            raise NotFound("scene", scene_id)
        return row

    async def update_scene(
        self, conn: asyncpg.Connection, p: Principal, req: R.UpdateSceneRequest
    ) -> Result[IX.Scene]:
        v = Validator()
        sid = v.require_uuid("scene.session_id", req.scene.session_id)
        scene_id = v.require_uuid("scene.id", req.scene.id)
        paths = list(dict.fromkeys(req.update_mask.paths))
        if not paths:
            v.add("update_mask", "is required")
        for path in paths:
            if path not in _SCENE_PATHS:
                v.add("update_mask", f"unknown or immutable path {path[:64]!r}")
                break
        fields = self._scene_fields(v, req.scene, paths)
        v.raise_if_any()
        if "name" in fields:
            fields["name"] = _clean("scene.name", fields["name"])
        ctx, _ = await self._presenter(conn, p, sid)
        row = await self._scene(conn, ctx, scene_id)
        if "slide_count" in fields:
            fields["current_slide"] = min(row.current_slide, max(fields["slide_count"] - 1, 0))
        row = await self.store.update_scene(conn, ctx.tenant_id, scene_id, fields)
        scene = convert.scene_proto(row)
        events = _events(ctx, req.request_id)
        mask = events_pb2.SceneUpdated(scene=scene)
        mask.update_mask.paths.extend(paths)
        await events.add(conn, mask, None)
        return Result(scene, events.records)

    async def delete_scene(
        self, conn: asyncpg.Connection, p: Principal, req: R.DeleteSceneRequest
    ) -> Result[str]:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        scene_id = v.require_uuid("scene_id", req.scene_id)
        v.raise_if_any()
        ctx, _ = await self._presenter(conn, p, sid)
        row = await self._scene(conn, ctx, scene_id)
        if row.is_active:
            raise FailedPrecondition(
                "FAILED_PRECONDITION",
                "the active scene cannot be deleted; switch to another scene first",
                metadata={"sceneId": scene_id},
            )
        await self.store.delete_scene(conn, ctx.tenant_id, scene_id)
        events = _events(ctx, req.request_id)
        await events.add(conn, events_pb2.SceneDeleted(scene_id=scene_id), None)
        return Result(scene_id, events.records)

    async def list_scenes(
        self, conn: asyncpg.Connection, p: Principal, req: R.ListScenesRequest
    ) -> tuple[list[IX.Scene], str]:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        size = page_size(req.page_size, default=50, cap=100)
        v.raise_if_any()
        after = _time_cursor(req.page_token)
        ctx = await self._member(conn, p, sid, write=False)
        rows = await self.store.list_scenes(conn, ctx.tenant_id, sid, after, size + 1)
        page, more = rows[:size], len(rows) > size
        token = encode_page_token(page[-1].created_at.isoformat(), page[-1].id) if more else ""
        return [convert.scene_proto(r) for r in page], token

    def _default_studio(self, session_id: str) -> StudioRow:
        return StudioRow(
            session_id=session_id,
            active_scene_id=None,
            layout="speaker",
            deck_id="",
            slide_index=0,
            slide_count=0,
            slide_url="",
            seq=0,
            updated_actor={},
            updated_at=datetime.min,
        )

    async def set_scene(
        self, conn: asyncpg.Connection, p: Principal, req: R.SetSceneRequest
    ) -> Result[IX.StudioState]:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        scene_id = v.require_uuid("scene_id", req.scene_id) if req.scene_id else ""
        v.require_enum("layout", req.layout, set(convert.LAYOUTS.values()) | {0})
        v.check(
            bool(scene_id) or req.layout != IX.SCENE_LAYOUT_UNSPECIFIED,
            "scene_id",
            "a scene_id or a layout is required",
        )
        v.raise_if_any()
        ctx, seq = await self._presenter(conn, p, sid)
        state = await self.store.studio(conn, ctx.tenant_id, sid) or self._default_studio(sid)
        layout_override = _LAYOUT_NAMES.get(req.layout, "")
        active: SceneRow | None = None
        if scene_id:
            active = await self._scene(conn, ctx, scene_id)
            if not active.is_active:
                await self.store.deactivate_scenes(conn, ctx.tenant_id, sid)
                active = await self.store.update_scene(
                    conn, ctx.tenant_id, scene_id, {"is_active": True}
                )
            state = replace(
                state,
                active_scene_id=active.id,
                layout=layout_override or active.layout,
                deck_id=active.slide_deck_id,
                slide_index=active.current_slide,
                slide_count=active.slide_count,
                slide_url="",
            )
        else:
            if state.active_scene_id:
                active = await self.store.scene(conn, ctx.tenant_id, sid, state.active_scene_id)
            state = replace(state, layout=layout_override)
        state = replace(state, seq=seq, updated_actor=actor_dict(ctx.actor()))
        state = await self.store.save_studio(conn, ctx.tenant_id, state)
        studio = convert.studio_proto(sid, state, active)
        events = _events(ctx, req.request_id)
        record = await events.add(conn, events_pb2.SceneChanged(studio=studio), None)
        if record.seq != seq:
            raise RuntimeError(f"studio seq {seq} != event seq {record.seq}")
        return Result(studio, events.records)

    async def change_slide(
        self, conn: asyncpg.Connection, p: Principal, req: R.ChangeSlideRequest
    ) -> Result[IX.StudioState]:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        v.require_len("deck_id", req.deck_id, 0, 128)
        v.require_range("slide_index", req.slide_index, 0, 9999)
        _http_url(v, "slide_url", req.slide_url, 2048)
        v.raise_if_any()
        ctx, seq = await self._presenter(conn, p, sid)
        state = await self.store.studio(conn, ctx.tenant_id, sid) or self._default_studio(sid)
        active = (
            await self.store.scene(conn, ctx.tenant_id, sid, state.active_scene_id, for_update=True)
            if state.active_scene_id
            else None
        )
        deck = req.deck_id or (active.slide_deck_id if active else "") or state.deck_id
        if not deck:
            raise FailedPrecondition(
                "FAILED_PRECONDITION",
                "no slide deck: activate a scene with a deck or pass deck_id",
            )
        if active is not None and active.slide_deck_id == deck:
            count = active.slide_count
        else:
            count = state.slide_count if state.deck_id == deck else 0
        if count and req.slide_index >= count:
            raise InvalidArgument(
                [("slide_index", f"must be below the deck's slide count ({count})")]
            )
        previous = state.slide_index if state.deck_id == deck else 0
        if active is not None and active.slide_deck_id == deck:
            active = await self.store.update_scene(
                conn, ctx.tenant_id, active.id, {"current_slide": req.slide_index}
            )
        state = replace(
            state,
            deck_id=deck,
            slide_index=req.slide_index,
            slide_count=count,
            slide_url=req.slide_url,
            seq=seq,
            updated_actor=actor_dict(ctx.actor()),
        )
        state = await self.store.save_studio(conn, ctx.tenant_id, state)
        studio = convert.studio_proto(sid, state, active)
        events = _events(ctx, req.request_id)
        record = await events.add(
            conn,
            events_pb2.SlideChanged(slide=studio.slide, previous_slide_index=previous),
            None,
        )
        if record.seq != seq:
            raise RuntimeError(f"slide seq {seq} != event seq {record.seq}")
        return Result(studio, events.records)

    async def studio_state(
        self, conn: asyncpg.Connection, p: Principal, req: R.GetStudioStateRequest
    ) -> IX.StudioState:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        v.raise_if_any()
        ctx = await self._member(conn, p, sid, write=False)
        state = await self.store.studio(conn, ctx.tenant_id, sid)
        active = None
        if state is not None and state.active_scene_id:
            active = await self.store.scene(conn, ctx.tenant_id, sid, state.active_scene_id)
        return convert.studio_proto(sid, state, active)
