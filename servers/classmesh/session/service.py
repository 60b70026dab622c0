"""Rules of SessionService: the class lifecycle, lobby and seats, presence, study rooms,
attendance and analytics. No grpc here; SQL lives in store.py.

Mutations run inside the transaction `core.mutations.run_mutation` opens and return a
`Result` (value + the events appended); the servicer builds the response. Every mutation
of a session takes the session row lock first (`SELECT ... FOR UPDATE`), so the seat count
(`sessions.current_occupancy`), the participant rows and the event log change together and
in one order: N + K concurrent joins on N free seats seat exactly N.

Seats: a participant in the lobby, admitted, or disconnected within the reconnect grace
window holds a seat. A second join of the same user replaces the connection and keeps the
seat; a join within the grace window reconnects; a removed user never comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import asyncpg
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message

from classmesh.breakout.service import close_rooms_for_session_end
from classmesh.common.v1 import common_pb2
from classmesh.core.auth import ANY_SESSION, AccessToken, Principal, require
from classmesh.core.config import Config
from classmesh.core.db import connection, transaction
from classmesh.core.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Validator,
)
from classmesh.core.eventproto import EVENT_TYPES, EventBatch, actor_dict, log_payload, to_event
from classmesh.core.events import EventRecord, read_events
from classmesh.core.paging import decode_page_token, encode_page_token, page_size
from classmesh.core.sessionguard import check_live, check_not_removed, check_usable
from classmesh.core.timeutil import to_duration, to_timestamp
from classmesh.events.v1 import events_pb2
from classmesh.session import convert, rules
from classmesh.session.media import RouterProvisioner
from classmesh.session.replay import fold_session_events
from classmesh.session.store import (
    AuditRow,
    LogRow,
    NewParticipant,
    ParticipantRow,
    SessionRow,
    SessionStore,
    StudyRoomRow,
)
from classmesh.session.v1 import session_pb2, session_service_pb2

__all__ = [
    "FULL_RETRY_AFTER",
    "GUEST_KEY_DESCRIPTION",
    "JoinResult",
    "Result",
    "SessionService",
    "fold_session_events",
]

S = session_pb2
R = session_service_pb2
T = TypeVar("T")

#: RetryInfo of SESSION_FULL / ROOM_FULL: a seat frees up when someone leaves, which a
#: client cannot predict; poll no faster than this.
FULL_RETRY_AFTER = 30.0
#: Description of the per-tenant API key that signs guest tokens (created on first use;
#: revoking it in AdminService invalidates every guest token at once).
GUEST_KEY_DESCRIPTION = "classmesh guest tokens"
GUEST_CAPS = ("publish", "subscribe", "chat")
STUDY_ROOM_COUNT = 10
STUDY_ROOM_SEATS = 50
STUDY_ROOM_LIFETIME = timedelta(days=3650)
MAX_ID = 255
MAX_REQUEST_ID = 128
MAX_SEQ = 2**63 - 1
TERMINAL_EVENTS = frozenset({"session_ended", "session_cancelled", "session_deleted"})
#: Key of ParticipantJoined.current_occupancy in the logged payload (protobuf JSON with
#: proto field names, `log_payload`); the join statement fills it from the locked row.
_JOINED_OCCUPANCY = events_pb2.ParticipantJoined.DESCRIPTOR.fields_by_name["current_occupancy"].name

_SESSION_PATHS = {
    "title",
    "description",
    "instructor_id",
    "scheduled_start",
    "scheduled_end",
    "capacity",
    "recording_enabled",
    "lms_course_ref",
    "lms_lesson_ref",
    "settings",
}
_SETTINGS_FIELDS = {f.name for f in S.SessionSettings.DESCRIPTOR.fields}
_ASSIGNABLE_ROLES = {
    common_pb2.ROLE_INSTRUCTOR: "instructor",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_STUDENT: "student",
    common_pb2.ROLE_GUEST: "guest",
}
_STATUS_BY_ENUM = {v: k for k, v in convert.SESSION_STATUSES.items()}
_PSTATUS_BY_ENUM = {v: k for k, v in convert.PARTICIPANT_STATUSES.items()}
_ROLE_BY_ENUM = {v: k for k, v in convert.ROLES.items()}
_KIND_BY_ENUM = {v: k for k, v in convert.KINDS.items()}
_AUDIT_BY_ENUM = {v: k for k, v in convert.AUDIT_ACTIONS.items()}


# --------------------------------------------------------------------------- results


@dataclass
class Result(Generic[T]):
    """What a mutation produced: its value and the events to publish after commit."""

    value: T
    events: list[EventRecord] = field(default_factory=list)


@dataclass
class JoinResult:
    participant: ParticipantRow
    session: SessionRow
    reconnected: bool
    last_seq: int
    access_token: str = ""
    access_token_expiry: datetime | None = None


@dataclass
class AdmitResult:
    admitted: list[ParticipantRow]
    skipped: list[str]
    occupancy: int


@dataclass
class HeartbeatState:
    status: str
    session_status: str
    last_seq: int
    expires_at: datetime
    #: The participant was disconnected (or lost a race with the sweeper): the servicer
    #: runs `reconnect` as a mutation and answers with its outcome.
    needs_reconnect: bool = False


@dataclass
class LeaveResult:
    participant: ParticipantRow
    visit_seconds: float


@dataclass
class WatchPlan:
    session_id: str
    after_seq: int
    participant_id: str | None
    #: The session is over: replay up to this seq, then end the stream.
    stop_at: int | None


@dataclass
class GuestJoin:
    """A join through a join link, prepared before the transaction."""

    principal: Principal
    session_id: str
    link: str
    email: str


@dataclass
class Page(Generic[T]):
    items: list[T]
    next_token: str
    total: int = 0


@dataclass
class AttendanceRecord:
    participant: ParticipantRow
    connected_seconds: float
    lobby_seconds: float
    ratio: float


@dataclass
class Attendance:
    records: list[AttendanceRecord]
    next_token: str
    total: int
    session_seconds: float


# --------------------------------------------------------------------------- helpers


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _ts(
    v: Validator, name: str, msg: Message, field_name: str, *, required: bool
) -> datetime | None:
    if not msg.HasField(field_name):
        if required:
            v.add(name, "is required")
        return None
    ts: timestamp_pb2.Timestamp = getattr(msg, field_name)
    try:
        if not 0 <= ts.nanos < 1_000_000_000:
            raise ValueError("nanos")
        value = ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        v.add(name, "is not a valid timestamp")
        return None
    if not datetime(1970, 1, 1, tzinfo=UTC) <= value <= datetime(9000, 1, 1, tzinfo=UTC):
        v.add(name, "must be between 1970 and 9000")
        return None
    return value


def _time_range(
    v: Validator, name: str, tr: common_pb2.TimeRange
) -> tuple[datetime | None, datetime | None]:
    start = _ts(v, f"{name}.start_time", tr, "start_time", required=False)
    end = _ts(v, f"{name}.end_time", tr, "end_time", required=False)
    if start is not None and end is not None and end <= start:
        v.add(name, "end_time must be after start_time")
    return start, end


def _check_request_id(v: Validator, request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID:
        v.add("request_id", f"length must be between 1 and {MAX_REQUEST_ID} characters")


def _check_text(v: Validator, name: str, value: str, lo: int, hi: int) -> str:
    """Length bounds; a required text must not be blank."""
    if lo > 0 and not value.strip():
        v.add(name, "is required" if not value else "must not be blank")
    elif not lo <= len(value) <= hi:
        v.add(name, f"length must be between {lo} and {hi} characters")
    return value


def _cursor(token: str, arity: int) -> list[Any] | None:
    return decode_page_token(token, arity, reason="PAGE_TOKEN_INVALID")


def _bad_token() -> InvalidArgument:
    return InvalidArgument(
        [("page_token", "not a page token of this list")], reason="PAGE_TOKEN_INVALID"
    )


def _time_cursor(token: str) -> tuple[datetime, str] | None:
    values = _cursor(token, 2)
    if values is None:
        return None
    try:
        return datetime.fromisoformat(str(values[0])), str(uuid.UUID(str(values[1])))
    except (ValueError, TypeError) as exc:
        raise _bad_token() from exc


def _connected_fields(p: ParticipantRow, until: datetime) -> dict[str, Any]:
    """Fold the running connected stretch (connected_since .. until) into the totals."""
    if p.connected_since is None:
        return {}
    ms = p.total_connected_ms + max(0, int((until - p.connected_since).total_seconds() * 1000))
    return {"total_connected_ms": ms, "total_connected_seconds": int(round(ms / 1000))}


def _role_word(principal: Principal) -> str:
    return principal.role if principal.role in convert.ROLES else "student"


_Events = EventBatch


class _SeatQueue:
    """First joins of one session queue here, in arrival order, for their seat statement.

    Only an ordering aid for this process: the session row lock decides who gets a seat,
    for every process. Without it all the joins of a busy session wait in PostgreSQL on
    the row, which serves them in no particular order (each commit makes a new row
    version, and waiters chase versions) and spends CPU on every hand-over. With it, at
    most one join per process waits on the row (the next one, sent while the holder
    finishes), the rest wait here, first come first served.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, session_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(session_id) or (asyncio.Lock(), 0)
        self._locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[session_id]
            if users == 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)


# --------------------------------------------------------------------------- service


class SessionService:
    """Session rules; every method takes the connection (and transaction) it runs on."""

    def __init__(
        self,
        config: Config,
        *,
        store: SessionStore | None = None,
        media: RouterProvisioner | None = None,
    ) -> None:
        self.config = config
        self.store = store or SessionStore()
        self.media = media
        self._seat_queue = _SeatQueue()

    # ------------------------------------------------------------ timing knobs

    @property
    def touch_interval(self) -> float:
        """Presence is written at most this often per participant (seconds)."""
        return min(5.0, self.config.heartbeat_timeout_seconds / 4)

    # ------------------------------------------------------------ shared steps

    def _actor(self, principal: Principal, participant_id: str = "") -> dict[str, Any]:
        return actor_dict(
            common_pb2.Actor(
                user_id=principal.subject,
                display_name=principal.name[:100],
                role=convert.ROLES.get(principal.role, common_pb2.ROLE_UNSPECIFIED),
                kind=common_pb2.ACTOR_KIND_USER,
                participant_id=participant_id,
            )
        )

    @staticmethod
    def _system_actor() -> dict[str, Any]:
        return actor_dict(common_pb2.Actor(kind=common_pb2.ACTOR_KIND_SYSTEM))

    @staticmethod
    def _session_id(v: Validator, value: str, name: str = "session_id") -> str:
        return v.require_uuid(name, value)

    async def _load(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        session_id: str,
        *,
        lock: bool = False,
        include_deleted: bool = False,
    ) -> SessionRow:
        """The session (grant checked first), with the caller's participant status.

        With `lock`, the caller status comes from the snapshot taken before the lock wait:
        code that acts on the caller's participant row re-reads it after locking.
        """
        require(principal, session_id=session_id)
        row = await self.store.get_session(
            conn,
            principal.tenant_id,
            session_id,
            caller=principal.subject,
            for_update=lock,
            include_deleted=include_deleted,
        )
        if row is None:
            raise NotFound("session", session_id)
        check_not_removed(row.id, row.caller_status)
        return row

    @staticmethod
    def _require_owner(principal: Principal, row: SessionRow) -> None:
        """The session's own instructor (sub == instructor_id) or an admin."""
        if principal.role == "admin":
            return
        if principal.role == "instructor" and principal.subject == row.instructor_id:
            return
        raise PermissionDenied(
            "PERMISSION_MISSING",
            "only the session's instructor or an admin may do this",
            metadata={"requiredRoles": "admin,instructor", "instructorId": row.instructor_id},
        )

    @staticmethod
    def _require_moderator(principal: Principal, row: SessionRow) -> None:
        """Classes: instructors, assistants, admins. Study rooms: admins or `moderate`."""
        if row.kind == "study_room":
            if principal.role == "admin" or principal.can("moderate"):
                return
            raise PermissionDenied(
                "PERMISSION_MISSING",
                "moderating a study room needs the admin role or the moderate capability",
                metadata={"requiredCapability": "moderate"},
            )
        require(principal, roles=rules.MODERATOR_ROLES)

    def _session_message(self, row: SessionRow) -> session_pb2.Session:
        return convert.session_proto(row, show_link=False)

    def _participant_message(self, row: ParticipantRow, now: datetime) -> session_pb2.Participant:
        return convert.participant_proto(row, now)

    async def _close_visit(
        self,
        conn: asyncpg.Connection,
        p: ParticipantRow,
        *,
        now: datetime,
        final_status: str,
        reason: str,
        end: datetime | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[ParticipantRow, float, bool]:
        """End the participant's visit: `final_status` ('left'/'removed'), connected time
        folded in, a session_logs row when they were in the session. Returns (row, visit
        length in seconds, whether a seat was freed); the caller adjusts the seat count."""
        end_at = end or now
        held = p.status in rules.SEATED
        fields: dict[str, Any] = {
            "status": final_status,
            "left_at": now,
            "connected_since": None,
            "disconnected_at": None,
        }
        fields.update(_connected_fields(p, end_at))
        fields.update(extra or {})
        visit_start = p.visit_started_at or p.joined_at
        visit = max(0.0, (end_at - visit_start).total_seconds()) if held else 0.0
        if held:
            await self.store.insert_log(
                conn, participant=p, joined_at=visit_start, left_at=end_at, reason=reason
            )
        updated = await self.store.update_participant(conn, p, fields)
        return updated, visit, held

    def _full(self, row: SessionRow) -> ResourceExhausted:
        room = row.kind == "study_room"
        return ResourceExhausted(
            "ROOM_FULL" if room else "SESSION_FULL",
            FULL_RETRY_AFTER,
            f"the {'study room' if room else 'session'} is full ({row.capacity} seats)",
            metadata={
                "sessionId": row.id,
                "capacity": str(row.capacity),
                "currentOccupancy": str(row.current_occupancy),
            },
            quota_violations=[(f"session/{row.id}", f"{row.capacity} seats")],
        )

    # ================================================================ lifecycle

    def _validate_settings(self, v: Validator, settings: session_pb2.SessionSettings) -> None:
        v.require_range("settings.max_breakout_rooms", settings.max_breakout_rooms, 0, 50)
        v.require_range("settings.audio_only_threshold", settings.audio_only_threshold, 0, 1000)
        if settings.HasField("guest_token_ttl"):
            d = settings.guest_token_ttl
            seconds = d.seconds + d.nanos / 1e9
            lo, hi = rules.GUEST_TTL_MIN.total_seconds(), rules.GUEST_TTL_MAX.total_seconds()
            if not lo <= seconds <= hi or abs(d.nanos) >= 1_000_000_000:
                v.add("settings.guest_token_ttl", "must be between 5 minutes and 2 hours")

    async def create_session(
        self, conn: asyncpg.Connection, principal: Principal, req: R.CreateSessionRequest
    ) -> Result[SessionRow]:
        require(principal, roles=rules.OWNER_ROLES)
        v = Validator()
        _check_request_id(v, req.request_id)
        _check_text(v, "title", req.title, 1, 255)
        _check_text(v, "description", req.description, 0, 5000)
        _check_text(v, "instructor_id", req.instructor_id, 0, 128)
        v.require_enum("kind", req.kind, {0, *convert.KINDS.values()})
        start = _ts(v, "scheduled_start", req, "scheduled_start", required=True)
        end = _ts(v, "scheduled_end", req, "scheduled_end", required=True)
        kind = _KIND_BY_ENUM.get(req.kind, "class")
        if start is not None and end is not None:
            if end <= start:
                v.add("scheduled_end", "must be after scheduled_start")
            elif kind == "class" and end - start > rules.MAX_CLASS_LENGTH:
                v.add("scheduled_end", "must be at most 24 hours after scheduled_start")
        if req.capacity != 0:
            v.require_range("capacity", req.capacity, 1, 1000)
        _check_text(v, "lms_course_ref", req.lms_course_ref, 0, 255)
        _check_text(v, "lms_lesson_ref", req.lms_lesson_ref, 0, 255)
        if req.HasField("settings"):
            self._validate_settings(v, req.settings)
        v.raise_if_any()
        assert start is not None and end is not None
        instructor_id = req.instructor_id or principal.subject
        if principal.role != "admin" and instructor_id != principal.subject:
            raise PermissionDenied(
                "PERMISSION_MISSING",
                "instructors schedule their own sessions; admins may name any instructor",
                metadata={"requiredRoles": "admin"},
            )
        settings = (
            rules.normalize_settings(convert.settings_dict(req.settings))
            if req.HasField("settings")
            else rules.default_settings(kind)
        )
        values: dict[str, Any] = {
            "tenant_id": uuid.UUID(principal.tenant_id),
            "kind": kind,
            "title": req.title,
            "description": req.description,
            "instructor_id": instructor_id,
            "scheduled_start": start,
            "scheduled_end": end,
            "capacity": req.capacity or rules.DEFAULT_CAPACITY[kind],
            "join_link_token": secrets.token_urlsafe(48),
            "recording_enabled": req.recording_enabled
            if req.HasField("recording_enabled")
            else True,
            "lms_course_ref": req.lms_course_ref or None,
            "lms_lesson_ref": req.lms_lesson_ref or None,
            "settings": settings,
        }
        row = await self.store.insert_session(conn, **values)
        events = _Events(row.tenant_id, row.id, self._actor(principal), req.request_id)
        await events.add(conn, events_pb2.SessionCreated(session=self._session_message(row)))
        row = await self._reload(conn, row)
        return Result(row, events.records)

    async def _reload(self, conn: asyncpg.Connection, row: SessionRow) -> SessionRow:
        fresh = await self.store.get_session(conn, row.tenant_id, row.id, include_deleted=True)
        assert fresh is not None
        return fresh

    async def get_session(
        self, conn: asyncpg.Connection, principal: Principal, session_id: str
    ) -> SessionRow:
        v = Validator()
        sid = self._session_id(v, session_id)
        v.raise_if_any()
        return await self._load(conn, principal, sid)

    async def list_sessions(
        self, conn: asyncpg.Connection, principal: Principal, req: R.ListSessionsRequest
    ) -> Page[SessionRow]:
        v = Validator()
        size = page_size(req.page_size, default=50, cap=100)
        statuses = []
        for st in req.statuses:
            if st not in _STATUS_BY_ENUM:
                v.add("statuses", "must be SESSION_STATUS_SCHEDULED, _LIVE, _ENDED or _CANCELLED")
                break
            statuses.append(_STATUS_BY_ENUM[st])
        v.require_enum("kind", req.kind, {0, *convert.KINDS.values()})
        _check_text(v, "instructor_id", req.instructor_id, 0, 128)
        _check_text(v, "lms_course_ref", req.lms_course_ref, 0, 255)
        start_from, start_until = _time_range(v, "scheduled_start_range", req.scheduled_start_range)
        v.raise_if_any()
        after: tuple[datetime, str] | None = _time_cursor(req.page_token)
        if req.show_deleted and principal.role != "admin":
            raise PermissionDenied(
                "PERMISSION_MISSING",
                "only admins list deleted sessions",
                metadata={"requiredRoles": "admin"},
            )
        only = None if principal.session_id == ANY_SESSION else principal.session_id
        rows, total = await self.store.list_sessions(
            conn,
            tenant_id=principal.tenant_id,
            only_session=only,
            statuses=statuses,
            kind=_KIND_BY_ENUM.get(req.kind),
            instructor_id=req.instructor_id,
            start_from=start_from,
            start_until=start_until,
            lms_course_ref=req.lms_course_ref,
            show_deleted=req.show_deleted,
            after=after,
            limit=size + 1,
        )
        page, more = rows[:size], len(rows) > size
        token = encode_page_token(page[-1].scheduled_start.isoformat(), page[-1].id) if more else ""
        return Page(page, token, total)

    async def update_session(
        self, conn: asyncpg.Connection, principal: Principal, req: R.UpdateSessionRequest
    ) -> Result[SessionRow]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = self._session_id(v, req.session.id, "session.id")
        paths = list(req.update_mask.paths)
        if not paths:
            v.add("update_mask", "is required: name the fields to change")
        unknown = [
            p
            for p in paths
            if p not in _SESSION_PATHS
            and not (p.startswith("settings.") and p.removeprefix("settings.") in _SETTINGS_FIELDS)
        ]
        if unknown:
            v.add(
                "update_mask",
                f"unknown or read-only paths: {', '.join(sorted(set(unknown)))[:200]}",
            )
        s = req.session
        if "title" in paths:
            _check_text(v, "session.title", s.title, 1, 255)
        if "description" in paths:
            _check_text(v, "session.description", s.description, 0, 5000)
        if "instructor_id" in paths:
            _check_text(v, "session.instructor_id", s.instructor_id, 1, 128)
        if "capacity" in paths:
            v.require_range("session.capacity", s.capacity, 1, 1000)
        if "lms_course_ref" in paths:
            _check_text(v, "session.lms_course_ref", s.lms_course_ref, 0, 255)
        if "lms_lesson_ref" in paths:
            _check_text(v, "session.lms_lesson_ref", s.lms_lesson_ref, 0, 255)
        new_start = (
            _ts(v, "session.scheduled_start", s, "scheduled_start", required=True)
            if "scheduled_start" in paths
            else None
        )
        new_end = (
            _ts(v, "session.scheduled_end", s, "scheduled_end", required=True)
            if "scheduled_end" in paths
            else None
        )
        if "settings" in paths or any(p.startswith("settings.") for p in paths):
            self._validate_settings(v, s.settings)
        v.raise_if_any()

        row = await self._load(conn, principal, sid, lock=True)
        self._require_owner(principal, row)
        check_usable(row.id, row.status)
        fields: dict[str, Any] = {}
        for name in ("title", "description", "recording_enabled", "capacity"):
            if name in paths:
                fields[name] = getattr(s, name)
        for name in ("lms_course_ref", "lms_lesson_ref"):
            if name in paths:
                fields[name] = getattr(s, name) or None
        if "instructor_id" in paths:
            fields["instructor_id"] = s.instructor_id
        start = new_start or row.scheduled_start
        end = new_end or row.scheduled_end
        if new_start is not None and row.status == "live" and new_start != row.scheduled_start:
            raise FailedPrecondition(
                "INVALID_STATE_TRANSITION",
                "a live session's scheduled_start cannot change",
                metadata={"status": "SESSION_STATUS_LIVE"},
            )
        if new_start is not None or new_end is not None:
            bad = Validator()
            if end <= start:
                bad.add("session.scheduled_end", "must be after scheduled_start")
            elif row.kind == "class" and end - start > rules.MAX_CLASS_LENGTH:
                bad.add("session.scheduled_end", "must be at most 24 hours after scheduled_start")
            bad.raise_if_any()
            if new_start is not None:
                fields["scheduled_start"] = new_start
            if new_end is not None:
                fields["scheduled_end"] = new_end
        if "capacity" in paths and s.capacity < row.current_occupancy:
            raise FailedPrecondition(
                "CAPACITY_BELOW_OCCUPANCY",
                f"{row.current_occupancy} seats are taken; capacity cannot go below that",
                metadata={"currentOccupancy": str(row.current_occupancy)},
            )
        if "settings" in paths or any(p.startswith("settings.") for p in paths):
            given = convert.settings_dict(s.settings)
            if "settings" in paths:
                merged = rules.normalize_settings(given)
            else:
                merged = dict(row.settings)
                for p in paths:
                    if p.startswith("settings."):
                        key = p.removeprefix("settings.")
                        merged[key] = given.get(key)
                merged = rules.normalize_settings(merged)
            fields["settings"] = merged
        updated = await self.store.update_session(conn, row.tenant_id, row.id, fields)
        events = _Events(row.tenant_id, row.id, self._actor(principal), req.request_id)
        await events.add(
            conn,
            events_pb2.SessionUpdated(
                session=self._session_message(updated),
                update_mask=field_mask_pb2.FieldMask(paths=sorted(set(paths))),
            ),
        )
        return Result(await self._reload(conn, updated), events.records)

    async def _close_everyone(
        self,
        conn: asyncpg.Connection,
        row: SessionRow,
        events: _Events,
        *,
        reason: str,
    ) -> int:
        """Let every seated participant go (End, Cancel, Delete); returns how many."""
        people = await self.store.participants_by_status(
            conn, row.tenant_id, row.id, sorted(rules.SEATED)
        )
        occupancy = row.current_occupancy
        for p in people:
            updated, visit, freed = await self._close_visit(
                conn, p, now=row.db_now, final_status="left", reason=reason
            )
            occupancy -= 1 if freed else 0
            await events.add(
                conn,
                events_pb2.ParticipantLeft(
                    participant=self._participant_message(updated, row.db_now),
                    grace_expired=False,
                    visit_duration=to_duration(timedelta(seconds=round(visit, 3))),
                    current_occupancy=max(0, occupancy),
                ),
            )
        return len(people)

    async def delete_session(
        self, conn: asyncpg.Connection, principal: Principal, req: R.DeleteSessionRequest
    ) -> Result[SessionRow]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = self._session_id(v, req.session_id)
        v.raise_if_any()
        row = await self._load(conn, principal, sid, lock=True)
        self._require_owner(principal, row)
        if row.status == "live" and (row.kind == "class" or row.current_occupancy > 0):
            raise FailedPrecondition(
                "INVALID_STATE_TRANSITION",
                "a live session cannot be deleted; end it first"
                if row.kind == "class"
                else "a study room with people in it cannot be deleted",
                metadata={"status": "SESSION_STATUS_LIVE"},
            )
        events = _Events(row.tenant_id, row.id, self._actor(principal), req.request_id)
        await self._close_everyone(conn, row, events, reason="session_ended")
        updated = await self.store.update_session(
            conn, row.tenant_id, row.id, {"deleted_at": row.db_now, "current_occupancy": 0}
        )
        await events.add(
            conn,
            events_pb2.SessionDeleted(session_id=row.id, delete_time=to_timestamp(row.db_now)),
        )
        await self.store.insert_audit(
            conn,
            tenant_id=row.tenant_id,
            session_id=row.id,
            actor_id=principal.subject,
            actor_role=_role_word(principal),
            action="session_deleted",
            target_type="session",
            target_id=row.id,
            metadata={"actorName": principal.name[:100], "title": row.title},
            request_id=req.request_id,
        )
        return Result(await self._reload(conn, updated), events.records)

    async def rotate_join_link(
        self, conn: asyncpg.Connection, principal: Principal, req: R.RotateJoinLinkRequest
    ) -> Result[SessionRow]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = self._session_id(v, req.session_id)
        v.raise_if_any()
        row = await self._load(conn, principal, sid, lock=True)
        self._require_owner(principal, row)
        check_usable(row.id, row.status)
        updated = await self.store.update_session(
            conn, row.tenant_id, row.id, {"join_link_token": secrets.token_urlsafe(48)}
        )
        events = _Events(row.tenant_id, row.id, self._actor(principal), req.request_id)
        await events.add(
            conn,
            events_pb2.SessionUpdated(
                session=self._session_message(updated),
                update_mask=field_mask_pb2.FieldMask(paths=["join_link_token"]),
            ),
        )
        await self.store.insert_audit(
            conn,
            tenant_id=row.tenant_id,
            session_id=row.id,
            actor_id=principal.subject,
            actor_role=_role_word(principal),
            action="join_link_rotated",
            target_type="session",
            target_id=row.id,
            metadata={"actorName": principal.name[:100]},
            request_id=req.request_id,
        )
        return Result(await self._reload(conn, updated), events.records)

    async def start_session(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        req: R.StartSessionRequest,
        *,
        authorization: str | None,
    ) -> Result[tuple[SessionRow, str]]:
        """SCHEDULED -> LIVE, from 10 minutes before scheduled_start.

        The media router is created before the state change commits, and while no session
        row lock is held (MediaService appends to the same session's log): an unreachable
        MediaService fails the start with nothing changed. A concurrent start that wins in
        the meantime is caught by the re-check under the lock.
        """
        require(principal, roles=rules.OWNER_ROLES)
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = self._session_id(v, req.session_id)
        v.raise_if_any()
        row = await self._load(conn, principal, sid)
        self._require_owner(principal, row)
        self._check_startable(row)
        router_id = ""
        if self.media is not None:
            router_id = await self.media.create_router(
                session_id=row.id, request_id=req.request_id, authorization=authorization
            )
        row = await self._load(conn, principal, sid, lock=True)
        self._check_startable(row)
        events = _Events(row.tenant_id, row.id, self._actor(principal), req.request_id)
        fields: dict[str, Any] = {"status": "live", "actual_start": row.db_now}
        if router_id:
            fields["media_router_id"] = router_id
        updated = await self.store.update_session(conn, row.tenant_id, row.id, fields)
        await events.add(conn, events_pb2.SessionStarted(session=self._session_message(updated)))
        if row.kind == "class" and not row.settings.get("lobby_enabled", True):
            # Nobody waits for admission in a class without a lobby once it is live.
            for p in await self.store.participants_by_status(
                conn, row.tenant_id, row.id, ["lobby"]
            ):
                admitted = await self._admit_one(conn, p, row.db_now)
                await events.add(
                    conn,
                    events_pb2.ParticipantAdmitted(
                        participant=self._participant_message(admitted, row.db_now),
                        current_occupancy=row.current_occupancy,
                    ),
                )
        return Result((await self._reload(conn, updated), router_id), events.records)

    def _check_startable(self, row: SessionRow) -> None:
        check_usable(row.id, row.status)
        if row.status == "live":
            meta = {
                "sessionId": row.id,
                "status": "SESSION_STATUS_LIVE",
                "lastSeq": str(row.last_seq),
                "currentOccupancy": str(row.current_occupancy),
            }
            if row.actual_start is not None:
                meta["actualStart"] = _iso(row.actual_start)
            if row.media_router_id:
                meta["routerId"] = row.media_router_id
            raise Aborted("SESSION_ALREADY_LIVE", "the session is already live", metadata=meta)
        if row.kind == "class" and rules.start_too_early(row.db_now, row.scheduled_start):
            earliest = rules.earliest_start(row.scheduled_start)
            raise FailedPrecondition(
                "TOO_EARLY",
                "a session cannot start more than 10 minutes before its scheduled start "
                f"(earliest: {_iso(earliest)})",
                metadata={
                    "earliestStartTime": _iso(earliest),
                    "scheduledStart": _iso(row.scheduled_start),
                },
            )

    async def end_session(
        self, conn: asyncpg.Connection, principal: Principal, req: R.EndSessionRequest
    ) -> Result[SessionRow]:
        require(principal, roles=rules.OWNER_ROLES)
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = self._session_id(v, req.session_id)
        _check_text(v, "reason", req.reason, 0, 500)
        v.raise_if_any()
        row = await self._load(conn, principal, sid, lock=True)
        self._require_owner(principal, row)
        check_live(row.id, row.status)
        events = _Events(row.tenant_id, row.id, self._actor(principal), req.request_id)
        await close_rooms_for_session_end(conn, row.tenant_id, row.id, events)
        count = await self._close_everyone(conn, row, events, reason="session_ended")
        updated = await self.store.update_session(
            conn,
            row.tenant_id,
            row.id,
            {"status": "ended", "actual_end": row.db_now, "current_occupancy": 0},
        )
        await events.add(
            conn,
            events_pb2.SessionEnded(session=self._session_message(updated), reason=req.reason),
        )
        await self.store.insert_audit(
            conn,
            tenant_id=row.tenant_id,
            session_id=row.id,
            actor_id=principal.subject,
            actor_role=_role_word(principal),
            action="session_ended",
            target_type="session",
            target_id=row.id,
            reason=req.reason,
            metadata={"actorName": principal.name[:100], "participantsLetGo": count},
            request_id=req.request_id,
        )
        return Result(await self._reload(conn, updated), events.records)

    async def cancel_session(
        self, conn: asyncpg.Connection, principal: Principal, req: R.CancelSessionRequest
    ) -> Result[SessionRow]:
        require(principal, roles=rules.OWNER_ROLES)
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = self._session_id(v, req.session_id)
        _check_text(v, "reason", req.reason, 0, 500)
        v.raise_if_any()
        row = await self._load(conn, principal, sid, lock=True)
        self._require_owner(principal, row)
        check_usable(row.id, row.status)
        if row.status == "live":
            raise FailedPrecondition(
                "INVALID_STATE_TRANSITION",
                "a live session cannot be cancelled; end it instead",
                metadata={"status": "SESSION_STATUS_LIVE"},
            )
        events = _Events(row.tenant_id, row.id, self._actor(principal), req.request_id)
        await self._close_everyone(conn, row, events, reason="session_ended")
        updated = await self.store.update_session(
            conn, row.tenant_id, row.id, {"status": "cancelled", "current_occupancy": 0}
        )
        await events.add(
            conn,
            events_pb2.SessionCancelled(session=self._session_message(updated), reason=req.reason),
        )
        await self.store.insert_audit(
            conn,
            tenant_id=row.tenant_id,
            session_id=row.id,
            actor_id=principal.subject,
            actor_role=_role_word(principal),
            action="session_cancelled",
            target_type="session",
            target_id=row.id,
            reason=req.reason,
            metadata={"actorName": principal.name[:100]},
            request_id=req.request_id,
        )
        return Result(await self._reload(conn, updated), events.records)

    # ================================================================ join / leave

    def validate_join(self, req: R.JoinSessionRequest) -> None:
        v = Validator()
        _check_request_id(v, req.request_id)
        target = req.WhichOneof("target")
        if target is None:
            v.add("session_id", "is required (or join_link_token for a guest join)")
        elif target == "session_id":
            self._session_id(v, req.session_id)
        else:
            token = req.join_link_token
            if len(token) != 64 or not all(c.isalnum() or c in "-_" for c in token):
                v.add("join_link_token", "must be the 64-character token of a join link")
            _check_text(v, "display_name", req.display_name, 1, 100)
        if target != "join_link_token" and req.display_name:
            _check_text(v, "display_name", req.display_name, 1, 100)
        if req.email:
            if not 3 <= len(req.email) <= 254 or "@" not in req.email:
                v.add("email", "must be an e-mail address of at most 254 characters")
        _check_text(v, "study_session_id", req.study_session_id, 0, 128)
        v.raise_if_any()

    async def prepare_guest_join(
        self, conn: asyncpg.Connection, req: R.JoinSessionRequest
    ) -> GuestJoin:
        """Resolve a join link to its session and a fresh guest identity (before the
        transaction: the guest principal keys the request_id)."""
        self.validate_join(req)
        row = await self.store.get_session_by_link(conn, req.join_link_token)
        if row is None:
            raise NotFound(
                "join_link",
                "(hidden)",
                "the join link is invalid or was replaced",
                reason="JOIN_LINK_INVALID",
            )
        if not row.settings.get("allow_guests", False):
            raise PermissionDenied(
                "GUESTS_NOT_ALLOWED",
                "this session does not admit guests",
                metadata={"sessionId": row.id},
            )
        guest_id = str(uuid.uuid4())
        principal = Principal(
            tenant_id=row.tenant_id,
            subject=guest_id,
            name=req.display_name.strip()[:100],
            role="guest",
            session_id=row.id,
            capabilities=frozenset(GUEST_CAPS),
            key_id="",
            token_id="",
            expires_at=_now() + rules.GUEST_TTL_MAX,
            guest=True,
        )
        return GuestJoin(
            principal=principal, session_id=row.id, link=req.join_link_token, email=req.email
        )

    async def join(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        req: R.JoinSessionRequest,
        *,
        guest: GuestJoin | None = None,
    ) -> Result[JoinResult]:
        """Join (or rejoin, reconnect, replace the connection). Seats are exact.

        Every join of a session queues on its row lock, and the lock is held until commit,
        so the common case (a first join needing nothing but a seat) keeps it for ONE
        statement plus the idempotency record and COMMIT. Before it, one statement reads
        the session and the caller's status and upserts the user; the new visit and its
        event are worked out from that read; then `store.join_seat` claims the seat, takes
        the seq, inserts the participant and appends the event, on condition that what the
        visit was worked out from is still so under the lock. Anything else (a rejoin, a
        study room's first visitor, an error to explain, a session changed meanwhile) takes
        the step-by-step path.
        """
        if guest is None:
            self.validate_join(req)
            sid = str(uuid.UUID(req.session_id))
        else:
            sid = guest.session_id
        require(principal, session_id=sid)
        role = _role_word(principal)
        name = self._display_name(req, principal)
        seen = await self.store.read_for_join(
            conn,
            principal.tenant_id,
            sid,
            principal.subject,
            user=None if principal.guest else (name, role),
        )
        if seen is not None and seen.caller_status is not None:
            check_not_removed(sid, seen.caller_status)
            return await self._rejoin(conn, principal, req, sid, guest)
        if seen is None or not self._plain_first_join(seen, guest, role):
            return await self._join_step_by_step(conn, principal, req, sid, guest, role, name)
        now = seen.db_now
        landing = rules.landing_status(
            kind=seen.kind, session_status=seen.status, role=role, settings=seen.settings
        )
        visit = self._visit_fields(req, seen, role, landing)
        new = NewParticipant(
            id=uuid.uuid4(),
            user_id=principal.subject,
            display_name=name,
            role=role,
            status=landing,
            is_guest=principal.guest,
            audio_muted=visit["audio_muted"],
            permissions=rules.default_permissions(role, seen.settings),
            joined_at=now,
            connection_id=visit["connection_id"],
            last_seen_at=now,
            visit_started_at=now,
            admitted_at=visit["admitted_at"],
            connected_since=visit["connected_since"],
            study_session_id=visit.get("study_session_id"),
            email=(guest.email or None) if guest is not None else None,
        )
        expected = new.row(seen.tenant_id, seen.id)
        # The event without the seat count, which only the locked row knows.
        type_, payload = log_payload(
            events_pb2.ParticipantJoined(participant=self._participant_message(expected, now))
        )
        actor = self._actor(principal)
        async with self._seat_queue.turn(seen.id):
            claim = await self.store.join_seat(
                conn,
                seen=seen,
                link=guest.link if guest is not None else None,
                participant=new,
                event_type=type_,
                payload=payload,
                occupancy_key=_JOINED_OCCUPANCY,
                actor=actor,
                request_id=req.request_id or None,
            )
        if claim is None:
            # No seat taken: full, or the session changed after we read it.
            return await self._join_step_by_step(conn, principal, req, sid, guest, role, name)
        if claim.participant is None:
            # The same user's other tab inserted first (we waited on its lock): hand the
            # seat and the seq back and take the rejoin path against its row.
            await self.store.release_seat(conn, seen.tenant_id, seen.id)
            return await self._rejoin(conn, principal, req, sid, guest)
        if claim.participant != expected or claim.event is None:
            # The log would describe another row than the table holds: refuse (rolls back).
            raise RuntimeError(
                f"participant {new.id} of session {seen.id} differs from the one to be logged"
            )
        session = replace(
            claim.session, lobby_count=claim.session.lobby_count + (1 if landing == "lobby" else 0)
        )
        result = JoinResult(claim.participant, session, reconnected=False, last_seq=claim.event.seq)
        if guest is not None:
            await self._mint_guest_token(conn, claim.session, principal, result, now)
        return Result(result, [claim.event])

    @staticmethod
    def _plain_first_join(row: SessionRow, guest: GuestJoin | None, role: str) -> bool:
        """`row` (read without the lock) lets a first join in with nothing but a seat."""
        return (
            row.status in ("scheduled", "live")
            and not (row.kind == "study_room" and row.status == "scheduled")
            and (guest is None or row.join_link_token == guest.link)
            and not rules.join_too_late(
                row.db_now, kind=row.kind, role=role, scheduled_end=row.scheduled_end
            )
            and row.current_occupancy < row.capacity
        )

    async def _join_step_by_step(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        req: R.JoinSessionRequest,
        sid: str,
        guest: GuestJoin | None,
        role: str,
        name: str,
    ) -> Result[JoinResult]:
        """A first join, one statement at a time from the seat claim on: explains a refusal,
        opens a study room, and takes whatever state the session has under the lock."""
        row = await self.store.claim_seat(conn, principal.tenant_id, sid)
        if row is None:
            # No seat taken: say why (gone, over, or full).
            current = await self.store.get_session(conn, principal.tenant_id, sid)
            if current is None:
                raise NotFound("session", sid)
            self._check_joinable(current, guest, role)
            raise self._full(current)
        self._check_joinable(row, guest, role)
        now = row.db_now
        events = _Events(row.tenant_id, row.id, self._actor(principal), req.request_id)
        if row.kind == "study_room" and row.status == "scheduled":
            # A study room opens with its first visitor (session.proto SessionStatus).
            row = await self._open_room(conn, row, events)
        landing = rules.landing_status(
            kind=row.kind, session_status=row.status, role=role, settings=row.settings
        )
        participant = await self.store.insert_participant(
            conn,
            on_conflict_skip=True,
            tenant_id=uuid.UUID(row.tenant_id),
            session_id=uuid.UUID(row.id),
            user_id=principal.subject,
            display_name=name,
            role=role,
            is_guest=principal.guest,
            permissions=rules.default_permissions(role, row.settings),
            joined_at=now,
            email=(guest.email or None) if guest is not None else None,
            **self._visit_fields(req, row, role, landing),
        )
        if participant is None:
            # The same user's other tab inserted first (we waited on its lock): hand the
            # seat back and take the rejoin path against its row.
            await self.store.adjust_occupancy(conn, row.tenant_id, row.id, -1)
            return await self._rejoin(conn, principal, req, sid, guest)
        await events.add(
            conn,
            events_pb2.ParticipantJoined(
                participant=self._participant_message(participant, now),
                current_occupancy=row.current_occupancy,
            ),
        )
        session = replace(
            row,
            last_seq=events.last_seq,
            lobby_count=row.lobby_count + (1 if landing == "lobby" else 0),
        )
        result = JoinResult(participant, session, reconnected=False, last_seq=events.last_seq)
        if guest is not None:
            await self._mint_guest_token(conn, row, principal, result, now)
        return Result(result, events.records)

    async def _open_room(
        self, conn: asyncpg.Connection, row: SessionRow, events: _Events
    ) -> SessionRow:
        """SCHEDULED -> LIVE for a study room (its first join, or StartSession)."""
        opened = await self.store.update_session(
            conn, row.tenant_id, row.id, {"status": "live", "actual_start": row.db_now}
        )
        await events.add(conn, events_pb2.SessionStarted(session=self._session_message(opened)))
        # The seat this join claimed is already counted in `row`.
        return replace(row, status="live", actual_start=row.db_now, updated_at=opened.updated_at)

    @staticmethod
    def _display_name(req: R.JoinSessionRequest, principal: Principal) -> str:
        return (req.display_name.strip() or principal.name.strip() or principal.subject)[:100]

    def _check_joinable(self, row: SessionRow, guest: GuestJoin | None, role: str) -> None:
        if guest is not None and row.join_link_token != guest.link:
            raise NotFound(
                "join_link", "(hidden)", "the join link was replaced", reason="JOIN_LINK_INVALID"
            )
        check_usable(row.id, row.status)
        if rules.join_too_late(
            row.db_now, kind=row.kind, role=role, scheduled_end=row.scheduled_end
        ):
            raise FailedPrecondition(
                "TOO_LATE",
                "joining closed 15 minutes after the scheduled end",
                metadata={
                    "scheduledEnd": _iso(row.scheduled_end),
                    "latestJoinTime": _iso(row.scheduled_end + rules.JOIN_GRACE_AFTER_END),
                },
            )

    @staticmethod
    def _visit_fields(
        req: R.JoinSessionRequest, row: SessionRow, role: str, landing: str
    ) -> dict[str, Any]:
        """Columns of a new visit (first join or a join after leaving)."""
        now = row.db_now
        muted = (
            row.kind == "class"
            and role in ("student", "guest")
            and bool(row.settings.get("mute_on_entry", True))
        )
        fields: dict[str, Any] = {
            "connection_id": uuid.uuid4(),
            "last_seen_at": now,
            "status": landing,
            "visit_started_at": now,
            "admitted_at": now if landing == "admitted" else None,
            "connected_since": now if landing == "admitted" else None,
            "audio_muted": muted,
        }
        if req.study_session_id:
            fields["study_session_id"] = req.study_session_id
        return fields

    async def _rejoin(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        req: R.JoinSessionRequest,
        sid: str,
        guest: GuestJoin | None,
    ) -> Result[JoinResult]:
        """A join by someone who has a participant row: replace, reconnect, or a new visit."""
        row = await self._load(conn, principal, sid, lock=True)
        existing = await self.store.get_participant(conn, row.tenant_id, row.id, principal.subject)
        assert existing is not None  # rows are never deleted while the session exists
        # Read after the lock: a removal that committed while we waited is seen here.
        check_not_removed(row.id, existing.status)
        self._check_joinable(row, guest, existing.role)
        now = row.db_now
        events = _Events(row.tenant_id, row.id, self._actor(principal), req.request_id)
        base: dict[str, Any] = {"connection_id": uuid.uuid4(), "last_seen_at": now}
        if req.study_session_id:
            base["study_session_id"] = req.study_session_id
        reconnected = False
        session = row
        if existing.status in ("lobby", "admitted"):
            # Another tab: the new connection replaces the old one; same seat.
            participant = await self.store.update_participant(conn, existing, base)
            await events.add(
                conn,
                events_pb2.ParticipantReconnected(
                    participant=self._participant_message(participant, now)
                ),
            )
        elif existing.status == "disconnected":
            # Back within the grace window: the seat was kept.
            back = "admitted" if existing.admitted_at is not None else "lobby"
            fields = {
                **base,
                "status": back,
                "disconnected_at": None,
                "join_count": existing.join_count + 1,
                "connected_since": now if back == "admitted" else None,
            }
            participant = await self.store.update_participant(conn, existing, fields)
            reconnected = True
            await events.add(
                conn,
                events_pb2.ParticipantReconnected(
                    participant=self._participant_message(participant, now)
                ),
            )
        else:
            # A new visit after leaving: needs a seat again.
            if row.current_occupancy >= row.capacity:
                raise self._full(row)
            landing = rules.landing_status(
                kind=row.kind, session_status=row.status, role=existing.role, settings=row.settings
            )
            participant = await self.store.update_participant(
                conn,
                existing,
                {
                    **self._visit_fields(req, row, existing.role, landing),
                    "display_name": self._display_name(req, principal),
                    "left_at": None,
                    "disconnected_at": None,
                    "join_count": existing.join_count + 1,
                },
            )
            occupancy = await self.store.adjust_occupancy(conn, row.tenant_id, row.id, 1)
            session = replace(
                row,
                current_occupancy=occupancy,
                lobby_count=row.lobby_count + (1 if landing == "lobby" else 0),
            )
            await events.add(
                conn,
                events_pb2.ParticipantJoined(
                    participant=self._participant_message(participant, now),
                    current_occupancy=occupancy,
                ),
            )
        if participant.status == "lobby" and existing.status == "disconnected":
            session = replace(session, lobby_count=session.lobby_count + 1)
        session = replace(session, last_seq=events.last_seq)
        result = JoinResult(participant, session, reconnected=reconnected, last_seq=events.last_seq)
        if guest is not None:
            await self._mint_guest_token(conn, row, principal, result, now)
        return Result(result, events.records)

    async def _mint_guest_token(
        self,
        conn: asyncpg.Connection,
        row: SessionRow,
        principal: Principal,
        result: JoinResult,
        now: datetime,
    ) -> None:
        expiry = rules.guest_token_expiry(
            now, kind=row.kind, scheduled_end=row.scheduled_end, settings=row.settings
        )
        if expiry - now < timedelta(seconds=1):
            raise FailedPrecondition(
                "TOO_LATE",
                "the session is about to close to guests",
                metadata={"latestJoinTime": _iso(row.scheduled_end + rules.JOIN_GRACE_AFTER_END)},
            )
        key_id, secret = await self.store.guest_signing_key(
            conn, row.tenant_id, GUEST_KEY_DESCRIPTION
        )
        issued = _now()
        ttl = expiry - now
        token = (
            AccessToken(key_id, secret)
            .with_tenant(row.tenant_id)
            .with_identity(principal.subject, principal.name)
            .with_grants(session=row.id, role="guest", caps=GUEST_CAPS)
            .with_issued_at(issued)
            .with_ttl(ttl)
        )
        jwt_text = token.to_jwt()
        expires_at = datetime.fromtimestamp(int((issued + ttl).timestamp()), UTC)
        await self.store.insert_guest_token(
            conn,
            tenant_id=row.tenant_id,
            session_id=row.id,
            token=jwt_text,
            display_name=principal.name or "Guest",
            created_by=principal.subject,
            expires_at=expires_at,
        )
        result.access_token = jwt_text
        result.access_token_expiry = expires_at

    def join_hints(self, result: JoinResult) -> session_pb2.MediaHints:
        threshold = int(result.session.settings.get("audio_only_threshold", 0) or 0)
        audio_only = threshold > 0 and result.session.current_occupancy > threshold
        return session_pb2.MediaHints(
            router_id=result.session.media_router_id,
            breakout_room_id=result.participant.breakout_room_id,
            audio_only=audio_only,
            max_spatial_layer=0 if audio_only else 2,
        )

    async def leave(
        self, conn: asyncpg.Connection, principal: Principal, req: R.LeaveSessionRequest
    ) -> Result[LeaveResult]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = self._session_id(v, req.session_id)
        v.raise_if_any()
        row = await self._load(conn, principal, sid, lock=True)
        check_usable(row.id, row.status)
        p = await self.store.get_participant(conn, row.tenant_id, row.id, principal.subject)
        check_not_removed(row.id, p.status if p is not None else None)
        if p is None or p.status not in rules.SEATED:
            # Seed 003 property 8: leaving a room one is not in is "not found".
            raise NotFound("participant", principal.subject, "you are not in this session")
        updated, visit, freed = await self._close_visit(
            conn, p, now=row.db_now, final_status="left", reason="left"
        )
        occupancy = row.current_occupancy
        if freed:
            occupancy = await self.store.adjust_occupancy(conn, row.tenant_id, row.id, -1)
        events = _Events(row.tenant_id, row.id, self._actor(principal, p.id), req.request_id)
        await events.add(
            conn,
            events_pb2.ParticipantLeft(
                participant=self._participant_message(updated, row.db_now),
                grace_expired=False,
                visit_duration=to_duration(timedelta(seconds=round(visit, 3))),
                current_occupancy=occupancy,
            ),
        )
        return Result(LeaveResult(updated, visit), events.records)

    # ================================================================ presence

    async def heartbeat(
        self, conn: asyncpg.Connection, principal: Principal, req: R.HeartbeatRequest
    ) -> HeartbeatState:
        """Touch presence (no lock, no event, one round trip) or ask for a reconnect."""
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = self._session_id(v, req.session_id)
        v.raise_if_any()
        require(principal, session_id=sid)
        r = await self.store.heartbeat(
            conn, principal.tenant_id, sid, principal.subject, self.touch_interval
        )
        if r is None or r["deleted_at"] is not None:
            raise NotFound("session", sid)
        status: str | None = r["status"]
        check_not_removed(sid, status)
        check_usable(sid, r["session_status"])
        if status is None:
            raise PermissionDenied(
                "NOT_IN_SESSION",
                "you are not a participant of this session; join it first",
                metadata={"sessionId": sid},
            )
        now: datetime = r["db_now"]
        seen: datetime | None = r["touched_at"] or r["seen_before"]
        stale = (
            status in ("lobby", "admitted")
            and r["touched_at"] is None
            and (seen is None or (now - seen).total_seconds() > self.touch_interval * 2)
        )
        return HeartbeatState(
            status=status,
            session_status=r["session_status"],
            last_seq=int(r["last_seq"]),
            expires_at=(seen or now) + timedelta(seconds=self.config.heartbeat_timeout_seconds),
            needs_reconnect=status == "disconnected" or stale,
        )

    async def reconnect(
        self, conn: asyncpg.Connection, principal: Principal, req: R.HeartbeatRequest
    ) -> Result[HeartbeatState]:
        """A heartbeat from a participant the sweeper had marked disconnected: back in."""
        sid = str(uuid.UUID(req.session_id))
        row = await self._load(conn, principal, sid, lock=True)
        check_usable(row.id, row.status)
        p = await self.store.get_participant(conn, row.tenant_id, row.id, principal.subject)
        check_not_removed(row.id, p.status if p is not None else None)
        if p is None:
            raise PermissionDenied("NOT_IN_SESSION", "you are not a participant of this session")
        events = _Events(row.tenant_id, row.id, self._actor(principal, p.id), req.request_id)
        now = row.db_now
        if p.status == "disconnected":
            back = "admitted" if p.admitted_at is not None else "lobby"
            p = await self.store.update_participant(
                conn,
                p,
                {
                    "status": back,
                    "disconnected_at": None,
                    "last_seen_at": now,
                    "join_count": p.join_count + 1,
                    "connected_since": now if back == "admitted" else None,
                },
            )
            await events.add(
                conn,
                events_pb2.ParticipantReconnected(participant=self._participant_message(p, now)),
            )
        elif p.status in ("lobby", "admitted"):
            p = await self.store.update_participant(conn, p, {"last_seen_at": now})
        return Result(
            HeartbeatState(
                status=p.status,
                session_status=row.status,
                last_seq=events.last_seq or row.last_seq,
                expires_at=now + timedelta(seconds=self.config.heartbeat_timeout_seconds),
            ),
            events.records,
        )

    async def sweep(self, pool: asyncpg.Pool, *, limit: int = 100) -> list[EventRecord]:
        """One pass of the presence sweeper: overdue -> disconnected, grace over -> left.

        Safe with several instances: each session is taken with `FOR UPDATE SKIP LOCKED`
        (a session busy elsewhere waits for the next pass) and its participants are
        re-checked under that lock.
        """
        timeout = self.config.heartbeat_timeout_seconds
        grace = self.config.presence_grace_seconds
        async with connection(pool) as conn:
            targets = await self.store.stale_sessions(conn, timeout, grace, limit)
        out: list[EventRecord] = []
        for tenant_id, session_id in targets:
            async with transaction(pool) as conn:
                if await self.store.lock_session_nowait(conn, tenant_id, session_id) is None:
                    continue
                row = await self.store.get_session(
                    conn, tenant_id, session_id, include_deleted=True
                )
                if row is None:
                    continue
                overdue = await self.store.overdue_participants(
                    conn, tenant_id, session_id, timeout, grace
                )
                events = _Events(tenant_id, session_id, self._system_actor(), None)
                now = row.db_now
                occupancy = row.current_occupancy
                freed_total = 0
                for p in overdue:
                    if p.status in ("lobby", "admitted"):
                        fields: dict[str, Any] = {
                            "status": "disconnected",
                            "disconnected_at": now,
                            "connected_since": None,
                        }
                        fields.update(_connected_fields(p, p.last_seen_at or now))
                        updated = await self.store.update_participant(conn, p, fields)
                        await events.add(
                            conn,
                            events_pb2.ParticipantDisconnected(
                                participant=self._participant_message(updated, now),
                                grace_expire_time=to_timestamp(now + timedelta(seconds=grace)),
                            ),
                        )
                    else:
                        last = p.last_seen_at or p.disconnected_at or now
                        updated, visit, freed = await self._close_visit(
                            conn,
                            p,
                            now=now,
                            final_status="left",
                            reason="disconnected",
                            end=max(last, p.visit_started_at or p.joined_at),
                        )
                        if freed:
                            occupancy -= 1
                            freed_total += 1
                        await events.add(
                            conn,
                            events_pb2.ParticipantLeft(
                                participant=self._participant_message(updated, now),
                                grace_expired=True,
                                visit_duration=to_duration(timedelta(seconds=round(visit, 3))),
                                current_occupancy=max(0, occupancy),
                            ),
                        )
                if freed_total:
                    await self.store.adjust_occupancy(conn, tenant_id, session_id, -freed_total)
                out.extend(events.records)
        return out

    async def touch(self, pool: asyncpg.Pool, participant_ids: Sequence[str]) -> None:
        """Presence of participants with an open WatchSession stream."""
        if not participant_ids:
            return
        async with connection(pool) as conn:
            await self.store.touch_presence(conn, participant_ids, self.touch_interval)

    # ================================================================ moderation

    async def _moderation_target(
        self, conn: asyncpg.Connection, principal: Principal, session_id: str, user_id: str
    ) -> tuple[SessionRow, ParticipantRow | None]:
        row = await self._load(conn, principal, session_id, lock=True)
        self._require_moderator(principal, row)
        check_usable(row.id, row.status)
        target = await self.store.get_participant(conn, row.tenant_id, row.id, user_id)
        return row, target

    def _check_outranks(self, principal: Principal, target: ParticipantRow) -> None:
        """Assistants (and `moderate` holders) do not act on instructors or admins."""
        if principal.role in ("admin", "instructor"):
            return
        if target.role in ("instructor", "admin") and target.user_id != principal.subject:
            raise PermissionDenied(
                "PERMISSION_MISSING",
                "only instructors and admins act on instructors",
                metadata={"requiredRoles": "admin,instructor"},
            )

    async def _check_last_instructor(
        self, conn: asyncpg.Connection, row: SessionRow, user_id: str, role: str | None
    ) -> None:
        if role != "instructor" and user_id != row.instructor_id:
            return
        others = await self.store.count_active_role(
            conn, row.tenant_id, row.id, "instructor", excluding_user=user_id
        )
        if others == 0:
            raise FailedPrecondition(
                "LAST_INSTRUCTOR",
                "cannot remove or demote the session's last instructor",
                metadata={"sessionId": row.id, "userId": user_id},
            )

    async def _admit_one(
        self, conn: asyncpg.Connection, p: ParticipantRow, now: datetime
    ) -> ParticipantRow:
        waited = max(0, int((now - (p.visit_started_at or p.joined_at)).total_seconds() * 1000))
        return await self.store.update_participant(
            conn,
            p,
            {
                "status": "admitted",
                "admitted_at": now,
                "connected_since": now,
                "lobby_wait_ms": p.lobby_wait_ms + waited,
            },
        )

    async def admit(
        self, conn: asyncpg.Connection, principal: Principal, req: R.AdmitParticipantsRequest
    ) -> Result[AdmitResult]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = self._session_id(v, req.session_id)
        if len(req.user_ids) > 1000:
            v.add("user_ids", "at most 1000 user ids")
        elif not req.all:
            if not req.user_ids:
                v.add("user_ids", "name the users to admit, or set all")
            elif any(not 1 <= len(u) <= MAX_ID for u in req.user_ids):
                v.add("user_ids", f"every user id must be 1-{MAX_ID} characters")
        v.raise_if_any()
        row = await self._load(conn, principal, sid, lock=True)
        self._require_moderator(principal, row)
        check_usable(row.id, row.status)
        wanted = None if req.all else list(dict.fromkeys(req.user_ids))
        lobby = await self.store.participants_by_status(
            conn, row.tenant_id, row.id, ["lobby"], user_ids=wanted
        )
        events = _Events(row.tenant_id, row.id, self._actor(principal), req.request_id)
        admitted = []
        for p in lobby:
            a = await self._admit_one(conn, p, row.db_now)
            admitted.append(a)
            await events.add(
                conn,
                events_pb2.ParticipantAdmitted(
                    participant=self._participant_message(a, row.db_now),
                    current_occupancy=row.current_occupancy,
                ),
            )
        done = {p.user_id for p in admitted}
        skipped = [u for u in (wanted or []) if u not in done]
        return Result(AdmitResult(admitted, skipped, row.current_occupancy), events.records)

    async def remove(
        self, conn: asyncpg.Connection, principal: Principal, req: R.RemoveParticipantRequest
    ) -> Result[ParticipantRow]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = self._session_id(v, req.session_id)
        _check_text(v, "user_id", req.user_id, 1, MAX_ID)
        _check_text(v, "reason", req.reason, 0, 500)
        v.raise_if_any()
        row, target = await self._moderation_target(conn, principal, sid, req.user_id)
        await self._check_last_instructor(
            conn, row, req.user_id, target.role if target is not None else None
        )
        if target is None:
            raise NotFound("participant", req.user_id)
        self._check_outranks(principal, target)
        if target.status == "removed":
            return Result(target)
        events = _Events(row.tenant_id, row.id, self._actor(principal), req.request_id)
        updated, _visit, freed = await self._close_visit(
            conn,
            target,
            now=row.db_now,
            final_status="removed",
            reason="removed",
            extra={"removed_by": principal.subject, "removed_reason": req.reason or None},
        )
        occupancy = row.current_occupancy
        if freed:
            occupancy = await self.store.adjust_occupancy(conn, row.tenant_id, row.id, -1)
        await events.add(
            conn,
            events_pb2.ParticipantRemoved(
                participant=self._participant_message(updated, row.db_now),
                reason=req.reason,
                current_occupancy=occupancy,
            ),
        )
        await self.store.insert_audit(
            conn,
            tenant_id=row.tenant_id,
            session_id=row.id,
            actor_id=principal.subject,
            actor_role=_role_word(principal),
            action="participant_removed",
            target_type="user",
            target_id=target.user_id,
            reason=req.reason,
            metadata={
                "actorName": principal.name[:100],
                "participantId": target.id,
                "previousStatus": target.status,
                "kind": row.kind,
            },
            request_id=req.request_id,
        )
        return Result(updated, events.records)

    async def mute(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        req: R.MuteParticipantRequest | R.UnmuteParticipantRequest,
        *,
        muted: bool,
    ) -> Result[ParticipantRow]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = self._session_id(v, req.session_id)
        _check_text(v, "user_id", req.user_id, 1, MAX_ID)
        if not (req.audio or req.video or req.screen):
            v.add("audio", "set at least one of audio, video, screen")
        v.raise_if_any()
        row = await self._load(conn, principal, sid, lock=True)
        self_service = req.user_id == principal.subject
        if not self_service:
            self._require_moderator(principal, row)
        check_usable(row.id, row.status)
        target = await self.store.get_participant(conn, row.tenant_id, row.id, req.user_id)
        if target is None:
            raise NotFound("participant", req.user_id)
        if target.status not in rules.SEATED:
            raise FailedPrecondition(
                "INVALID_STATE_TRANSITION",
                "the participant is no longer in the session",
                metadata={"status": target.status},
            )
        if not self_service:
            self._check_outranks(principal, target)
        fields: dict[str, Any] = {}
        if muted:
            for flag in ("audio", "video", "screen"):
                if getattr(req, flag):
                    fields[f"{flag}_muted"] = True
        else:
            # A moderator may re-allow video and screen, but only asks for the microphone:
            # nobody opens someone else's microphone (the event carries the ask).
            for flag in ("audio", "video", "screen"):
                if getattr(req, flag) and (self_service or flag != "audio"):
                    fields[f"{flag}_muted"] = False
        updated = await self.store.update_participant(conn, target, fields) if fields else target
        events = _Events(row.tenant_id, row.id, self._actor(principal), req.request_id)
        message: Message
        if muted:
            message = events_pb2.ParticipantMuted(
                participant=self._participant_message(updated, row.db_now),
                audio=req.audio,
                video=req.video,
                screen=req.screen,
            )
        else:
            message = events_pb2.ParticipantUnmuted(
                participant=self._participant_message(updated, row.db_now),
                audio=req.audio,
                video=req.video,
                screen=req.screen,
            )
        await events.add(conn, message)
        if muted and not self_service:
            await self.store.insert_audit(
                conn,
                tenant_id=row.tenant_id,
                session_id=row.id,
                actor_id=principal.subject,
                actor_role=_role_word(principal),
                action="participant_muted",
                target_type="user",
                target_id=target.user_id,
                metadata={
                    "actorName": principal.name[:100],
                    "audio": req.audio,
                    "video": req.video,
                    "screen": req.screen,
                },
                request_id=req.request_id,
            )
        return Result(updated, events.records)

    async def update_permissions(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        req: R.UpdateParticipantPermissionsRequest,
    ) -> Result[ParticipantRow]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = self._session_id(v, req.session_id)
        _check_text(v, "user_id", req.user_id, 1, MAX_ID)
        paths = list(req.update_mask.paths)
        if not paths:
            v.add("update_mask", "is required: permissions, permissions.<field> or role")
        bad = [
            p
            for p in paths
            if p not in ("permissions", "role")
            and not (
                p.startswith("permissions.")
                and p.removeprefix("permissions.") in convert.PERMISSION_FIELDS
            )
        ]
        if bad:
            v.add("update_mask", f"unknown paths: {', '.join(sorted(set(bad)))[:200]}")
        if "role" in paths and req.role not in _ASSIGNABLE_ROLES:
            v.add("role", "must be ROLE_INSTRUCTOR, ROLE_ASSISTANT, ROLE_STUDENT or ROLE_GUEST")
        v.raise_if_any()
        row, target = await self._moderation_target(conn, principal, sid, req.user_id)
        if target is None:
            raise NotFound("participant", req.user_id)
        if target.status == "removed":
            raise FailedPrecondition(
                "INVALID_STATE_TRANSITION",
                "the participant was removed",
                metadata={"status": "removed"},
            )
        self._check_outranks(principal, target)
        fields: dict[str, Any] = {}
        new_role = target.role
        if "role" in paths:
            new_role = _ASSIGNABLE_ROLES[req.role]
            if new_role == "guest" and not target.is_guest:
                raise InvalidArgument([("role", "only guests hold the guest role")])
            if target.is_guest and new_role != "guest":
                raise InvalidArgument([("role", "a guest has no account to promote")])
            if new_role == "instructor" and principal.role not in ("admin", "instructor"):
                raise PermissionDenied(
                    "PERMISSION_MISSING",
                    "only instructors and admins appoint instructors",
                    metadata={"requiredRoles": "admin,instructor"},
                )
            if target.role == "instructor" and new_role != "instructor":
                await self._check_last_instructor(conn, row, target.user_id, target.role)
            if new_role != target.role:
                fields["role"] = new_role
        perms = dict(target.permissions)
        if "role" in fields and not any(p.startswith("permissions") for p in paths):
            perms = rules.default_permissions(new_role, row.settings)
        given = convert.permissions_dict(req.permissions)
        for p in paths:
            if p == "permissions":
                perms = dict(given)
            elif p.startswith("permissions."):
                key = p.removeprefix("permissions.")
                perms[key] = given[key]
        if perms != target.permissions:
            fields["permissions"] = perms
        updated = await self.store.update_participant(conn, target, fields) if fields else target
        events = _Events(row.tenant_id, row.id, self._actor(principal), req.request_id)
        await events.add(
            conn,
            events_pb2.PermissionsChanged(
                participant=self._participant_message(updated, row.db_now),
                update_mask=field_mask_pb2.FieldMask(paths=sorted(set(paths))),
            ),
        )
        changed = {
            k: {"from": target.permissions.get(k, False), "to": v}
            for k, v in perms.items()
            if target.permissions.get(k, False) != v
        }
        await self.store.insert_audit(
            conn,
            tenant_id=row.tenant_id,
            session_id=row.id,
            actor_id=principal.subject,
            actor_role=_role_word(principal),
            action="permissions_changed",
            target_type="user",
            target_id=target.user_id,
            metadata={
                "actorName": principal.name[:100],
                "roleFrom": target.role,
                "roleTo": new_role,
                "permissions": changed,
            },
            request_id=req.request_id,
        )
        return Result(updated, events.records)

    # ================================================================ reads

    async def get_participant(
        self, conn: asyncpg.Connection, principal: Principal, req: R.GetParticipantRequest
    ) -> ParticipantRow:
        v = Validator()
        sid = self._session_id(v, req.session_id)
        _check_text(v, "user_id", req.user_id, 0, MAX_ID)
        v.raise_if_any()
        row = await self._load(conn, principal, sid)
        user_id = req.user_id or principal.subject
        p = await self.store.get_participant(conn, row.tenant_id, row.id, user_id)
        if p is None:
            raise NotFound("participant", user_id)
        return p

    async def list_participants(
        self, conn: asyncpg.Connection, principal: Principal, req: R.ListParticipantsRequest
    ) -> Page[ParticipantRow]:
        v = Validator()
        sid = self._session_id(v, req.session_id)
        size = page_size(req.page_size, default=100, cap=500)
        statuses, roles = [], []
        for st in req.statuses:
            if st not in _PSTATUS_BY_ENUM:
                v.add("statuses", "unknown participant status")
                break
            statuses.append(_PSTATUS_BY_ENUM[st])
        for role in req.roles:
            if role not in _ROLE_BY_ENUM:
                v.add("roles", "unknown role")
                break
            roles.append(_ROLE_BY_ENUM[role])
        room: str | None = None
        if req.breakout_room_id:
            room = v.require_uuid("breakout_room_id", req.breakout_room_id)
        v.raise_if_any()
        after = _time_cursor(req.page_token)
        row = await self._load(conn, principal, sid)
        rows, total = await self.store.list_participants(
            conn,
            tenant_id=row.tenant_id,
            session_id=row.id,
            statuses=statuses,
            roles=roles,
            breakout_room_id=room,
            after=after,
            limit=size + 1,
        )
        page, more = rows[:size], len(rows) > size
        token = encode_page_token(page[-1].joined_at.isoformat(), page[-1].id) if more else ""
        return Page(page, token, total)

    async def plan_watch(
        self, conn: asyncpg.Connection, principal: Principal, req: R.WatchSessionRequest
    ) -> WatchPlan:
        v = Validator()
        sid = self._session_id(v, req.session_id)
        v.require_range("after_seq", req.after_seq, 0, MAX_SEQ)
        v.raise_if_any()
        row = await self._load(conn, principal, sid)
        participant_id = None
        if row.caller_status in ("lobby", "admitted"):
            p = await self.store.get_participant(conn, row.tenant_id, row.id, principal.subject)
            participant_id = p.id if p is not None else None
        terminal = row.status in ("ended", "cancelled")
        return WatchPlan(
            session_id=row.id,
            after_seq=req.after_seq,
            participant_id=participant_id,
            stop_at=row.last_seq if terminal else None,
        )

    async def list_events(
        self, conn: asyncpg.Connection, principal: Principal, req: R.ListSessionEventsRequest
    ) -> tuple[list[events_pb2.Event], str, int]:
        v = Validator()
        sid = self._session_id(v, req.session_id)
        v.require_range("after_seq", req.after_seq, 0, MAX_SEQ)
        v.require_range("until_seq", req.until_seq, 0, MAX_SEQ)
        size = page_size(req.page_size, default=100, cap=500)
        types = list(dict.fromkeys(req.types))
        if len(types) > 100 or any(t not in EVENT_TYPES for t in types):
            v.add("types", "unknown event type (use the Event.payload field names)")
        v.raise_if_any()
        after = req.after_seq
        cursor = _cursor(req.page_token, 1)
        if cursor is not None:
            try:
                after = int(cursor[0])
            except (TypeError, ValueError) as exc:
                raise _bad_token() from exc
            if not 0 <= after <= MAX_SEQ:
                raise _bad_token()
        # Admins may still read a soft-deleted session's log (audit, replay).
        row = await self._load(conn, principal, sid, include_deleted=principal.role == "admin")
        records = await read_events(
            conn,
            tenant_id=row.tenant_id,
            session_id=row.id,
            after_seq=after,
            limit=size + 1,
            types=types or None,
        )
        if req.until_seq:
            records = [r for r in records if r.seq <= req.until_seq]
        page, more = records[:size], len(records) > size
        token = encode_page_token(page[-1].seq) if more else ""
        return [to_event(r) for r in page], token, row.last_seq

    async def attendance(
        self, conn: asyncpg.Connection, principal: Principal, req: R.GetAttendanceRequest
    ) -> Attendance:
        """Every participant for staff; a student or guest gets their own record only."""
        v = Validator()
        sid = self._session_id(v, req.session_id)
        size = page_size(req.page_size, default=100, cap=500)
        v.raise_if_any()
        after = _time_cursor(req.page_token)
        row = await self._load(conn, principal, sid)
        only = None if principal.role in rules.STAFF_ROLES else principal.subject
        rows, total = await self.store.attendance(
            conn,
            tenant_id=row.tenant_id,
            session_id=row.id,
            only_user=only,
            after=after,
            limit=size + 1,
        )
        now = _now()
        length = self._session_seconds(row, now)
        records = []
        for p in rows[:size]:
            connected = convert.connected_seconds(p, now)
            lobby = p.lobby_wait_ms / 1000.0
            if p.status == "lobby" and p.visit_started_at is not None:
                lobby += max(0.0, (now - p.visit_started_at).total_seconds())
            ratio = min(1.0, connected / length) if length > 0 else 0.0
            records.append(AttendanceRecord(p, connected, lobby, ratio))
        more = len(rows) > size
        token = (
            encode_page_token(rows[size - 1].joined_at.isoformat(), rows[size - 1].id)
            if more
            else ""
        )
        return Attendance(records, token, total, length)

    @staticmethod
    def _session_seconds(row: SessionRow, now: datetime) -> float:
        if row.actual_start is None:
            return 0.0
        end = row.actual_end or now
        return max(0.0, (end - row.actual_start).total_seconds())

    async def analytics(
        self, conn: asyncpg.Connection, principal: Principal, req: R.GetSessionAnalyticsRequest
    ) -> session_pb2.SessionAnalytics:
        v = Validator()
        sid = self._session_id(v, req.session_id)
        width = timedelta(minutes=5)
        if req.HasField("bucket_width"):
            d = req.bucket_width
            seconds = d.seconds + d.nanos / 1e9
            if not 60 <= seconds <= 3600 or abs(d.nanos) >= 1_000_000_000:
                v.add("bucket_width", "must be between 1 minute and 1 hour")
            else:
                width = timedelta(seconds=seconds)
        v.raise_if_any()
        row = await self._load(conn, principal, sid)
        now = _now()
        events: list[EventRecord] = []
        after = 0
        while True:
            batch = await read_events(
                conn,
                tenant_id=row.tenant_id,
                session_id=row.id,
                after_seq=after,
                limit=1000,
                types=sorted(_ROSTER_TYPES),
            )
            events.extend(batch)
            if len(batch) < 1000:
                break
            after = batch[-1].seq
        people = await self.store.participants_by_status(
            conn, row.tenant_id, row.id, sorted(convert.PARTICIPANT_STATUSES)
        )
        counts = await self.store.interaction_counts(conn, row.tenant_id, row.id)
        begin = row.actual_start or (events[0].created_at if events else row.created_at)
        finish = row.actual_end or now
        n_buckets = max(1, min(1000, int((finish - begin) / width) + 1))
        begin = max(begin, finish - width * n_buckets + width) if n_buckets == 1000 else begin
        times = await self.store.interaction_times(conn, row.tenant_id, row.id, begin)
        return build_analytics(
            session_id=row.id,
            events=events,
            people=people,
            counts=counts,
            times=times,
            begin=begin,
            width=width,
            n_buckets=n_buckets,
            now=now,
        )

    async def audit_log(
        self, conn: asyncpg.Connection, principal: Principal, req: R.ListAuditLogsRequest
    ) -> Page[AuditRow]:
        v = Validator()
        sid = self._session_id(v, req.session_id)
        size = page_size(req.page_size, default=50, cap=100)
        actions = []
        for a in req.actions:
            if a not in _AUDIT_BY_ENUM:
                v.add("actions", "unknown audit action")
                break
            actions.append(_AUDIT_BY_ENUM[a])
        _check_text(v, "actor_user_id", req.actor_user_id, 0, MAX_ID)
        start, end = _time_range(v, "time_range", req.time_range)
        v.raise_if_any()
        after = _time_cursor(req.page_token)
        require(principal, session_id=sid, roles=rules.MODERATOR_ROLES)
        row = await self._load(conn, principal, sid, include_deleted=principal.role == "admin")
        rows = await self.store.list_audit(
            conn,
            tenant_id=row.tenant_id,
            session_id=row.id,
            actions=actions,
            actor_id=req.actor_user_id,
            created_from=start,
            created_until=end,
            after=after,
            limit=size + 1,
        )
        page, more = rows[:size], len(rows) > size
        token = encode_page_token(page[-1].created_at.isoformat(), page[-1].id) if more else ""
        return Page(page, token)

    # ================================================================ study rooms

    async def list_study_rooms(
        self, conn: asyncpg.Connection, principal: Principal, req: R.ListStudyRoomsRequest
    ) -> Page[StudyRoomRow]:
        size = page_size(req.page_size, default=50, cap=100)
        cursor = _cursor(req.page_token, 2)
        after: tuple[str, str] | None = None
        if cursor is not None:
            try:
                after = (str(cursor[0]), str(uuid.UUID(str(cursor[1]))))
            except (ValueError, TypeError) as exc:
                raise _bad_token() from exc
        only = None if principal.session_id == ANY_SESSION else principal.session_id
        rows, total = await self.store.list_study_rooms(
            conn,
            tenant_id=principal.tenant_id,
            only_session=only,
            caller=principal.subject,
            only_available=req.only_available,
            after=after,
            limit=size + 1,
        )
        page, more = rows[:size], len(rows) > size
        token = encode_page_token(page[-1].name, page[-1].session_id) if more else ""
        return Page(page, token, total)

    async def list_study_room_logs(
        self, conn: asyncpg.Connection, principal: Principal, req: R.ListStudyRoomLogsRequest
    ) -> tuple[Page[LogRow], int]:
        v = Validator()
        size = page_size(req.page_size, default=100, cap=500)
        room: str | None = None
        if req.session_id:
            room = v.require_uuid("session_id", req.session_id)
        _check_text(v, "user_id", req.user_id, 0, MAX_ID)
        start, end = _time_range(v, "time_range", req.time_range)
        v.require_enum(
            "kind",
            req.kind,
            {
                S.STUDY_ROOM_LOG_KIND_UNSPECIFIED,
                S.STUDY_ROOM_LOG_KIND_VISIT,
                S.STUDY_ROOM_LOG_KIND_TIMER,
            },
        )
        v.raise_if_any()
        after = _time_cursor(req.page_token)
        user_id = req.user_id
        if principal.role not in rules.STAFF_ROLES:
            # Students and guests see their own visits only.
            if user_id and user_id != principal.subject:
                raise PermissionDenied(
                    "PERMISSION_MISSING",
                    "students may only read their own study-room logs",
                    metadata={"requiredRoles": "admin,assistant,instructor"},
                )
            user_id = principal.subject
        if principal.session_id != ANY_SESSION:
            if room is not None and room != principal.session_id:
                require(principal, session_id=room)
            room = principal.session_id
        kind = {S.STUDY_ROOM_LOG_KIND_VISIT: "visit", S.STUDY_ROOM_LOG_KIND_TIMER: "timer"}.get(
            req.kind
        )
        rows, total, seconds = await self.store.list_logs(
            conn,
            tenant_id=principal.tenant_id,
            session_id=room,
            user_id=user_id,
            created_from=start,
            created_until=end,
            kind=kind,
            after=after,
            limit=size + 1,
        )
        page, more = rows[:size], len(rows) > size
        token = encode_page_token(page[-1].created_at.isoformat(), page[-1].id) if more else ""
        return Page(page, token, total), seconds

    async def seed_study_rooms(
        self, conn: asyncpg.Connection, tenant_id: str
    ) -> tuple[list[SessionRow], int]:
        """Create the tenant's 10 study rooms x 50 seats (seed 003) that do not exist yet.

        Idempotent: rooms are matched by name ("Study Room 1".."Study Room 10"); concurrent
        runs for one tenant serialise on an advisory lock. Returns (all ten, created).
        """
        v = Validator()
        tid = v.require_uuid("tenant", tenant_id)
        v.raise_if_any()
        async with conn.transaction():
            if not await self.store.tenant_exists(conn, tid):
                raise NotFound("tenant", tid)
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('classmesh.study_rooms:' || $1::text))",
                tid,
            )
            existing = await self.store.study_room_names(conn, tid)
            now = await conn.fetchval("SELECT now()")
            created = 0
            for n in range(1, STUDY_ROOM_COUNT + 1):
                name = f"Study Room {n}"
                if name in existing:
                    continue
                row = await self.store.insert_session(
                    conn,
                    tenant_id=uuid.UUID(tid),
                    kind="study_room",
                    title=name,
                    description="Shared study room (seed 003)",
                    instructor_id="system",
                    scheduled_start=now,
                    scheduled_end=now + STUDY_ROOM_LIFETIME,
                    status="live",
                    actual_start=now,
                    capacity=STUDY_ROOM_SEATS,
                    join_link_token=secrets.token_urlsafe(48),
                    settings=rules.default_settings("study_room"),
                )
                events = _Events(tid, row.id, self._system_actor(), None)
                await events.add(
                    conn, events_pb2.SessionCreated(session=self._session_message(row))
                )
                created += 1
            rows, _ = await self.store.list_sessions(
                conn,
                tenant_id=tid,
                only_session=None,
                statuses=[],
                kind="study_room",
                instructor_id="",
                start_from=None,
                start_until=None,
                lms_course_ref="",
                show_deleted=False,
                after=None,
                limit=1000,
            )
        wanted = {f"Study Room {n}" for n in range(1, STUDY_ROOM_COUNT + 1)}
        rooms = sorted(
            (r for r in rows if r.title in wanted), key=lambda r: int(r.title.split()[-1])
        )
        return rooms, created


# ------------------------------------------------------------------------ analytics

_ROSTER_TYPES = frozenset(
    {
        "participant_joined",
        "participant_admitted",
        "participant_removed",
        "participant_left",
        "participant_disconnected",
        "participant_reconnected",
        "session_ended",
    }
)
_PRESENT = frozenset({"admitted", "disconnected"})


def build_analytics(
    *,
    session_id: str,
    events: Sequence[EventRecord],
    people: Sequence[ParticipantRow],
    counts: Mapping[str, int],
    times: Mapping[str, Collection[datetime]],
    begin: datetime,
    width: timedelta,
    n_buckets: int,
    now: datetime,
) -> session_pb2.SessionAnalytics:
    """Attendance analytics folded from the roster events; engagement from the counters."""
    status: dict[str, str] = {}
    users: set[str] = set()
    joins = leaves = removals = disconnects = 0
    present = peak = 0
    peak_time: datetime | None = None
    buckets = [session_pb2.AnalyticsBucket() for _ in range(n_buckets)]
    for i, b in enumerate(buckets):
        b.start_time.CopyFrom(to_timestamp(begin + width * i))

    def bucket(t: datetime) -> session_pb2.AnalyticsBucket | None:
        i = int((t - begin) / width)
        return buckets[i] if 0 <= i < n_buckets else None

    last_index = 0
    for e in events:
        idx = int((e.created_at - begin) / width)
        # Buckets without events carry the concurrency of their start.
        for i in range(max(0, last_index), min(max(idx, 0), n_buckets)):
            buckets[i].concurrent_participants = max(buckets[i].concurrent_participants, present)
        last_index = max(last_index, idx)
        eb = bucket(e.created_at)
        ev = to_event(e)
        kind = ev.WhichOneof("payload")
        if kind is None:
            continue
        if kind == "session_ended":
            continue
        p = getattr(ev, kind).participant
        user = p.user_id
        before = status.get(user, "")
        if kind == "participant_joined":
            users.add(user)
            joins += 1
            if eb is not None:
                eb.joins += 1
            after = "admitted" if p.status == S.PARTICIPANT_STATUS_ADMITTED else "lobby"
        elif kind == "participant_reconnected":
            after = "admitted" if p.status == S.PARTICIPANT_STATUS_ADMITTED else "lobby"
            if before == "disconnected":
                joins += 1
                if eb is not None:
                    eb.joins += 1
        elif kind == "participant_admitted":
            after = "admitted"
        elif kind == "participant_disconnected":
            after = "disconnected"
            disconnects += 1
        else:
            after = "removed" if kind == "participant_removed" else "left"
            if kind == "participant_removed":
                removals += 1
            if before in rules.SEATED:
                leaves += 1
                if eb is not None:
                    eb.leaves += 1
        status[user] = after
        present += (after in _PRESENT) - (before in _PRESENT)
        if present > peak:
            peak, peak_time = present, e.created_at
        if eb is not None:
            eb.concurrent_participants = max(eb.concurrent_participants, present)
    for i in range(max(0, last_index), n_buckets):
        buckets[i].concurrent_participants = max(buckets[i].concurrent_participants, present)

    for name, field_name in (
        ("chat_messages", "chat_messages"),
        ("questions", "questions"),
        ("question_votes", "question_votes"),
        ("poll_responses", "poll_responses"),
        ("hand_raises", "hand_raises"),
    ):
        for t in times.get(name, ()):
            tb = bucket(t)
            if tb is not None:
                setattr(tb, field_name, getattr(tb, field_name) + 1)

    admitted = [p for p in people if p.admitted_at is not None or p.total_connected_ms > 0]
    connected = [convert.connected_seconds(p, now) for p in admitted]
    waits = [p.lobby_wait_ms / 1000.0 for p in admitted if p.role in ("student", "guest")]
    unique = len(users | {p.user_id for p in people})
    out = session_pb2.SessionAnalytics(
        session_id=session_id,
        unique_participants=unique,
        total_joins=joins,
        total_leaves=leaves,
        removals=removals,
        peak_concurrency=peak,
        chat_messages=counts.get("chat", 0),
        questions_asked=counts.get("asked", 0),
        questions_answered=counts.get("answered", 0),
        question_votes=counts.get("votes", 0),
        polls_created=counts.get("polls", 0),
        poll_responses=counts.get("responses", 0),
        hand_raises=counts.get("hands", 0),
        engagement_score=round(min(100.0, 100.0 * counts.get("engaged", 0) / unique), 2)
        if unique
        else 0.0,
        health_score=round(max(0.0, 100.0 * (1 - disconnects / joins)), 2) if joins else 100.0,
        timeline=buckets,
    )
    if peak_time is not None:
        out.peak_time.CopyFrom(to_timestamp(peak_time))
    out.average_connected.CopyFrom(
        to_duration(
            timedelta(seconds=round(sum(connected) / len(connected), 3) if connected else 0)
        )
    )
    out.average_lobby_wait.CopyFrom(
        to_duration(timedelta(seconds=round(sum(waits) / len(waits), 3) if waits else 0))
    )
    out.bucket_width.CopyFrom(to_duration(width))
    out.compute_time.CopyFrom(to_timestamp(now))
    return out
