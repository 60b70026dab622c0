"""Rules of BreakoutService (seed 000 STR-012..017): open rooms explicitly or auto-assigned,
assign, move, join, leave, broadcast, extend, close; no grpc here, SQL in store.py.

Every mutation runs inside the transaction `core.mutations.run_mutation` opens and takes
the session row lock first (`require_live_session(..., for_update=True)`), the same lock
every event append and SessionService's seat changes take: a session's breakout changes
are serialised, so a room's capacity holds exactly under any number of concurrent assigns
(and instances), and a participant is in at most one open room (also a unique index).

Each mutation returns a `Result`: its value, the events it appended (published after
commit) and a `MediaPlan` (routers to open, media moves, routers to close) that the
servicer carries out after the commit (see breakout/media.py).

Events: the breakout lifecycle (rooms created, assigned, moved, broadcast, extended,
closed) is session-wide (`breakout_room_id` empty): every room's feed carries them as
announcements (InteractionService `ANNOUNCEMENTS`), since they tell clients to change room.
"""

from __future__ import annotations

import math
import random
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import asyncpg
from google.protobuf import duration_pb2

from classmesh.breakout import convert
from classmesh.breakout.store import ACTIVE, BreakoutStore, MemberRow, RoomRow
from classmesh.breakout.v1 import breakout_pb2, breakout_service_pb2
from classmesh.common.v1 import common_pb2
from classmesh.core.audit import insert_audit
from classmesh.core.auth import Principal, require
from classmesh.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Validator,
)
from classmesh.core.eventproto import EventBatch, actor_dict
from classmesh.core.events import EventRecord
from classmesh.core.paging import decode_page_token, encode_page_token, page_size
from classmesh.core.sessionguard import (
    SessionRef,
    check_not_removed,
    fetch_session,
    require_live_session,
)
from classmesh.core.timeutil import to_duration, to_timestamp
from classmesh.events.v1 import events_pb2
from classmesh.interaction.rules import neutralise

__all__ = ["MAX_ROOMS", "BreakoutService", "MediaPlan", "Result"]

B = breakout_pb2
R = breakout_service_pb2
T = TypeVar("T")

#: Breakout rooms open at once: a session has at most 50 media routers (main + 49).
MAX_ROOMS = 49
DEFAULT_CAPACITY = 10
MIN_CAPACITY, MAX_CAPACITY = 2, 50
MAX_LIMIT_MINUTES = 120
MAX_EXTEND_MINUTES = 60
MAX_ASSIGN = 50
MAX_TEXT = 1000
MAX_REQUEST_ID = 128
MAX_ID = 255
#: Roles that run breakouts (assistants need can_manage_breakouts, on by default).
MANAGER_ROLES = ("instructor", "assistant")
#: Roles auto-assignment distributes (assistants too with include_assistants).
LEARNER_ROLES = ("student", "guest")
BREAKOUT_TYPES = frozenset(
    {
        "breakout_rooms_created",
        "participant_assigned",
        "participant_moved",
        "breakout_broadcast",
        "breakout_rooms_extended",
        "breakout_room_closed",
        "breakout_rooms_closed",
    }
)
TERMINAL_TYPES = frozenset({"session_ended", "session_cancelled", "session_deleted"})


@dataclass
class MediaPlan:
    """Media work a committed change needs: routers to open (room ids), moves (user id,
    room id or "" for the main room), routers to close."""

    session_id: str = ""
    tenant_id: str = ""
    routers: list[str] = field(default_factory=list)
    moves: list[tuple[str, str]] = field(default_factory=list)
    closes: list[str] = field(default_factory=list)


@dataclass
class Result(Generic[T]):
    value: T
    events: list[EventRecord] = field(default_factory=list)
    media: MediaPlan = field(default_factory=MediaPlan)


@dataclass
class _Ctx:
    principal: Principal
    session: SessionRef
    me: MemberRow | None
    manager: bool

    @property
    def tenant_id(self) -> str:
        return self.session.tenant_id

    @property
    def session_id(self) -> str:
        return self.session.id


def _check_request_id(v: Validator, request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID:
        v.add("request_id", f"length must be between 1 and {MAX_REQUEST_ID} characters")


def _minutes(v: Validator, name: str, d: duration_pb2.Duration, lo: int, hi: int) -> int:
    if d.nanos != 0 or d.seconds % 60 != 0 or not lo <= d.seconds // 60 <= hi:
        v.add(name, f"must be whole minutes between {lo} and {hi}")
        return lo
    return d.seconds // 60


def _room_closed(room: RoomRow) -> FailedPrecondition:
    return FailedPrecondition(
        "BREAKOUT_ROOM_CLOSED",
        f"breakout room {room.name!r} is closed",
        metadata={"breakoutRoomId": room.id},
    )


def _room_full(room: RoomRow, wanted: int) -> ResourceExhausted:
    return ResourceExhausted(
        "ROOM_FULL",
        30.0,
        f"breakout room {room.name!r} is full ({room.count}/{room.capacity})",
        metadata={
            "breakoutRoomId": room.id,
            "capacity": str(room.capacity),
            "participantCount": str(room.count),
            "requested": str(wanted),
        },
        quota_violations=[(f"breakout_room/{room.id}", f"{room.capacity} participants")],
    )


def _limit_reached(asked: int, limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        "BREAKOUT_LIMIT_REACHED",
        0,
        f"at most {limit} breakout rooms may be open in this session (asked for {asked})",
        metadata={"maxBreakoutRooms": str(limit), "requested": str(asked)},
        quota_violations=[("breakout_rooms", f"{limit} rooms")],
    )


def _assignable(m: MemberRow) -> bool:
    """Only admitted participants (also while reconnecting) go into rooms."""
    return m.status in ("admitted", "disconnected")


class BreakoutService:
    """Breakout rules; every method takes the connection (and transaction) it runs on."""

    def __init__(self, store: BreakoutStore | None = None) -> None:
        self.store = store or BreakoutStore()

    # ------------------------------------------------------------ shared steps

    def _actor(self, ctx: _Ctx) -> dict[str, Any]:
        p = ctx.principal
        return actor_dict(
            common_pb2.Actor(
                user_id=p.subject,
                display_name=p.name[:100],
                role=convert.ROLES.get(p.role, common_pb2.ROLE_UNSPECIFIED),
                kind=common_pb2.ACTOR_KIND_USER,
                participant_id=ctx.me.id if ctx.me else "",
            )
        )

    @staticmethod
    def system_actor() -> dict[str, Any]:
        return actor_dict(common_pb2.Actor(kind=common_pb2.ACTOR_KIND_SYSTEM))

    async def _ctx(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        session_id: str,
        *,
        manage: bool,
        mutate: bool = True,
    ) -> _Ctx:
        """The live session (row locked for a mutation) and the caller in it."""
        require(principal, session_id=session_id)
        if manage and principal.role not in (*MANAGER_ROLES, "admin"):
            raise PermissionDenied(
                "PERMISSION_MISSING",
                "only instructors, assistants and admins run breakout rooms",
                metadata={"requiredRoles": "admin,assistant,instructor"},
            )
        if mutate:
            session = await require_live_session(
                conn, principal.tenant_id, session_id, live=True, for_update=True
            )
        else:
            session = await fetch_session(conn, principal.tenant_id, session_id)
        me = await self.store.member(conn, session.tenant_id, session.id, principal.subject)
        check_not_removed(session.id, me.status if me else None)
        manager = principal.role == "admin" or (
            principal.role in MANAGER_ROLES
            and (me is None or principal.role == "instructor" or me.can_manage_breakouts)
        )
        if manage and not manager:
            raise PermissionDenied(
                "PERMISSION_MISSING",
                "your can_manage_breakouts permission was taken away",
                metadata={"requiredPermission": "can_manage_breakouts"},
            )
        if not manager and principal.role != "admin":
            if me is None or me.status not in ACTIVE:
                raise PermissionDenied(
                    "NOT_IN_SESSION",
                    "you are not a participant of this session; join it first",
                    metadata={"sessionId": session.id},
                )
            if me.status == "lobby":
                raise PermissionDenied(
                    "NOT_ADMITTED",
                    "you are waiting in the lobby; an instructor has to admit you",
                    metadata={"sessionId": session.id},
                )
        return _Ctx(principal, session, me, manager)

    async def _room(
        self, conn: asyncpg.Connection, ctx: _Ctx, room_id: str, *, open_: bool
    ) -> RoomRow:
        room = await self.store.get_room(conn, ctx.tenant_id, room_id)
        if room is None or room.session_id != ctx.session_id:
            raise NotFound("breakout_room", room_id)
        if open_ and room.status != "open":
            raise _room_closed(room)
        return room

    async def _audit(
        self,
        conn: asyncpg.Connection,
        ctx: _Ctx,
        action: str,
        target_id: str,
        request_id: str,
        target_type: str = "breakout_room",
        **meta: Any,
    ) -> None:
        await insert_audit(
            conn,
            tenant_id=ctx.tenant_id,
            session_id=ctx.session_id,
            actor_id=ctx.principal.subject,
            actor_role=ctx.principal.role,
            action=action,
            target_type=target_type,
            target_id=target_id,
            metadata={"actorName": ctx.principal.name[:100], **meta},
            request_id=request_id,
        )

    def _max_rooms(self, session: SessionRef) -> int:
        configured = int(session.settings.get("max_breakout_rooms") or MAX_ROOMS)
        return max(1, min(MAX_ROOMS, configured))

    async def _protos(
        self, conn: asyncpg.Connection, rooms: Sequence[RoomRow], *, people: bool = True
    ) -> list[breakout_pb2.BreakoutRoom]:
        assigned = await self.store.assignments(conn, [r.id for r in rooms]) if people else None
        return [convert.room_proto(r, assigned) for r in rooms]

    async def _reload(self, conn: asyncpg.Connection, ctx: _Ctx, room_id: str) -> RoomRow:
        room = await self.store.get_room(conn, ctx.tenant_id, room_id)
        assert room is not None
        return room

    # ================================================================ create

    async def create_rooms(
        self, conn: asyncpg.Connection, principal: Principal, req: R.CreateBreakoutRoomsRequest
    ) -> Result[R.CreateBreakoutRoomsResponse]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = v.require_uuid("session_id", req.session_id)
        limit_minutes: int | None = None
        if req.HasField("time_limit"):
            limit_minutes = _minutes(v, "time_limit", req.time_limit, 1, MAX_LIMIT_MINUTES)
        mode = req.WhichOneof("assignment")
        if mode is None:
            v.add("assignment", "explicit or auto_assign is required")
        specs: list[tuple[str, int, list[str]]] = []
        if mode == "explicit":
            if not req.explicit.rooms:
                v.add("explicit.rooms", "at least one room is required")
            seen_users: set[str] = set()
            seen_names: set[str] = set()
            for i, spec in enumerate(req.explicit.rooms[: MAX_ROOMS + 1]):
                name = spec.name.strip() or f"Room {i + 1}"
                if len(spec.name) > 100:
                    v.add(f"explicit.rooms[{i}].name", "length must be at most 100 characters")
                elif name in seen_names:
                    v.add(f"explicit.rooms[{i}].name", "room names must be unique")
                seen_names.add(name)
                cap = spec.capacity or DEFAULT_CAPACITY
                if not MIN_CAPACITY <= cap <= MAX_CAPACITY:
                    v.add(f"explicit.rooms[{i}].capacity", "must be between 2 and 50")
                elif len(spec.user_ids) > cap:
                    v.add(f"explicit.rooms[{i}].user_ids", f"more users than its capacity {cap}")
                users = list(spec.user_ids)
                for u in users:
                    if not 1 <= len(u) <= MAX_ID:
                        v.add(f"explicit.rooms[{i}].user_ids", "user ids are 1-255 characters")
                        break
                    if u in seen_users:
                        v.add(f"explicit.rooms[{i}].user_ids", f"user {u!r} is in two rooms")
                        break
                    seen_users.add(u)
                specs.append((name, cap, users))
        elif mode == "auto_assign":
            a = req.auto_assign
            if a.room_count < 1:
                v.add("auto_assign.room_count", "must be between 1 and 50")
            if a.capacity and not MIN_CAPACITY <= a.capacity <= MAX_CAPACITY:
                v.add("auto_assign.capacity", "must be 0 or between 2 and 50")
            if len(a.name_prefix) > 90:
                v.add("auto_assign.name_prefix", "length must be at most 90 characters")
            if a.seed < 0:
                v.add("auto_assign.seed", "must not be negative")
        v.raise_if_any()
        ctx = await self._ctx(conn, principal, sid, manage=True)
        limit = self._max_rooms(ctx.session)
        asked = len(req.explicit.rooms) if mode == "explicit" else req.auto_assign.room_count
        if asked > limit:
            raise _limit_reached(asked, limit)
        if await self.store.count_rooms(conn, ctx.tenant_id, ctx.session_id, open_only=True):
            raise FailedPrecondition(
                "BREAKOUTS_ACTIVE",
                "breakout rooms are already open; close them first",
                metadata={"sessionId": ctx.session_id},
            )
        members = await self.store.members(conn, ctx.tenant_id, ctx.session_id)
        by_user = {m.user_id: m for m in members}
        seed = 0
        skipped: list[str] = []
        if mode == "auto_assign":
            a = req.auto_assign
            roles = (*LEARNER_ROLES, "assistant") if a.include_assistants else LEARNER_ROLES
            pool = sorted(
                (m for m in members if _assignable(m) and m.role in roles), key=lambda m: m.user_id
            )
            seed = a.seed or secrets.randbelow(2**53 - 1) + 1
            random.Random(seed).shuffle(pool)
            count = a.room_count
            cap = a.capacity or max(MIN_CAPACITY, math.ceil(len(pool) / count) if pool else 0)
            cap = min(cap, MAX_CAPACITY)
            prefix = a.name_prefix.strip() or "Room"
            groups: list[list[str]] = [[] for _ in range(count)]
            for i, m in enumerate(pool[: cap * count]):
                groups[i % count].append(m.user_id)
            specs = [(f"{prefix} {i + 1}", cap, g) for i, g in enumerate(groups)]
        move = req.move_immediately if req.HasField("move_immediately") else True
        events = EventBatch(ctx.tenant_id, ctx.session_id, self._actor(ctx), req.request_id)
        plan = MediaPlan(ctx.session_id, ctx.tenant_id)
        room_ids: list[str] = []
        placed: set[str] = set()
        for pos, (name, cap, users) in enumerate(specs):
            rid = await self.store.insert_room(
                conn,
                tenant_id=ctx.tenant_id,
                session_id=ctx.session_id,
                name=name,
                capacity=cap,
                time_limit_minutes=limit_minutes,
                position=pos,
                created_by=principal.subject,
            )
            room_ids.append(rid)
            plan.routers.append(rid)
            for u in users:
                found = by_user.get(u)
                if found is None or not _assignable(found):
                    skipped.append(u)
                    continue
                await self.store.assign(
                    conn,
                    tenant_id=ctx.tenant_id,
                    session_id=ctx.session_id,
                    room_id=rid,
                    participant_id=found.id,
                    assigned_by=principal.subject,
                    joined=move,
                )
                placed.add(u)
                if move:
                    plan.moves.append((u, rid))
        rooms = await self.store.rooms(conn, ctx.tenant_id, ctx.session_id, ids=room_ids)
        protos = await self._protos(conn, rooms)
        await events.add(conn, events_pb2.BreakoutRoomsCreated(rooms=protos, seed=seed))
        await self._audit(
            conn,
            ctx,
            "breakout_rooms_created",
            ctx.session_id,
            req.request_id,
            target_type="session",
            rooms=len(rooms),
            assigned=len(placed),
        )
        unassigned = sorted(
            m.user_id
            for m in members
            if _assignable(m) and m.role in LEARNER_ROLES and m.user_id not in placed
        )
        response = R.CreateBreakoutRoomsResponse(
            rooms=protos, seed=seed, skipped_user_ids=skipped, unassigned_user_ids=unassigned
        )
        return Result(response, events.records, plan)

    # ================================================================ reads

    async def get_room(
        self, conn: asyncpg.Connection, principal: Principal, room_id: str
    ) -> breakout_pb2.BreakoutRoom:
        v = Validator()
        rid = v.require_uuid("breakout_room_id", room_id)
        v.raise_if_any()
        room = await self.store.get_room(conn, principal.tenant_id, rid)
        if room is None:
            raise NotFound("breakout_room", rid)
        await self._ctx(conn, principal, room.session_id, manage=False, mutate=False)
        return (await self._protos(conn, [room]))[0]

    async def list_rooms(
        self, conn: asyncpg.Connection, principal: Principal, req: R.ListBreakoutRoomsRequest
    ) -> R.ListBreakoutRoomsResponse:
        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        if req.page_size < 0 or req.page_size > 1000:
            v.add("page_size", "must be between 0 and 100")
        v.raise_if_any()
        size = page_size(req.page_size, default=50, cap=100)
        cursor = decode_page_token(req.page_token, 3)
        after: tuple[datetime, int, str] | None = None
        if cursor is not None:
            try:
                after = (datetime.fromisoformat(str(cursor[0])), int(cursor[1]), str(cursor[2]))
                uuid.UUID(after[2])
            except (ValueError, TypeError) as exc:
                raise InvalidArgument(
                    [("page_token", "not a page token of this list")],
                    reason="PAGE_TOKEN_INVALID",
                ) from exc
        ctx = await self._ctx(conn, principal, sid, manage=False, mutate=False)
        open_only = not req.include_closed
        rooms = await self.store.rooms(
            conn, ctx.tenant_id, ctx.session_id, open_only=open_only, after=after, limit=size + 1
        )
        token = ""
        if len(rooms) > size:
            rooms = rooms[:size]
            created, pos = await self.store.room_cursor(conn, rooms[-1].id)
            token = encode_page_token(created.isoformat(), pos, rooms[-1].id)
        total = await self.store.count_rooms(
            conn, ctx.tenant_id, ctx.session_id, open_only=open_only
        )
        open_rooms = await self.store.rooms(conn, ctx.tenant_id, ctx.session_id)
        assigned = sum(r.count for r in open_rooms)
        members = await self.store.members(conn, ctx.tenant_id, ctx.session_id)
        main = sum(1 for m in members if _assignable(m) and m.room_id is None)
        return R.ListBreakoutRoomsResponse(
            rooms=await self._protos(conn, rooms, people=req.include_participants),
            next_page_token=token,
            total_size=total,
            assigned_count=assigned,
            main_room_count=main,
        )

    # ================================================================ assign / move

    async def _target(self, conn: asyncpg.Connection, ctx: _Ctx, user_id: str) -> MemberRow:
        m = await self.store.member(conn, ctx.tenant_id, ctx.session_id, user_id)
        if m is None or m.status not in ACTIVE:
            raise NotFound("participant", user_id)
        if m.status == "lobby":
            raise FailedPrecondition(
                "NOT_ADMITTED",
                "the participant waits in the lobby; admit them first",
                metadata={"userId": user_id},
            )
        return m

    async def assign(
        self, conn: asyncpg.Connection, principal: Principal, req: R.AssignParticipantsRequest
    ) -> Result[R.AssignParticipantsResponse]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = v.require_uuid("session_id", req.session_id)
        rid = v.require_uuid("breakout_room_id", req.breakout_room_id)
        if not 1 <= len(req.user_ids) <= MAX_ASSIGN:
            v.add("user_ids", f"between 1 and {MAX_ASSIGN} user ids")
        elif any(not 1 <= len(u) <= MAX_ID for u in req.user_ids):
            v.add("user_ids", "user ids are 1-255 characters")
        v.raise_if_any()
        ctx = await self._ctx(conn, principal, sid, manage=True)
        room = await self._room(conn, ctx, rid, open_=True)
        wanted = list(dict.fromkeys(req.user_ids))
        members = {
            m.user_id: m
            for m in await self.store.members(conn, ctx.tenant_id, ctx.session_id, user_ids=wanted)
        }
        skipped = [u for u in wanted if u not in members or not _assignable(members[u])]
        new = [members[u] for u in wanted if u not in skipped and members[u].room_id != room.id]
        if room.count + len(new) > room.capacity:
            raise _room_full(room, len(new))
        events = EventBatch(ctx.tenant_id, ctx.session_id, self._actor(ctx), req.request_id)
        plan = MediaPlan(ctx.session_id, ctx.tenant_id)
        for m in new:
            await self.store.assign(
                conn,
                tenant_id=ctx.tenant_id,
                session_id=ctx.session_id,
                room_id=room.id,
                participant_id=m.id,
                assigned_by=principal.subject,
                joined=True,
            )
            plan.moves.append((m.user_id, room.id))
        room = await self._reload(conn, ctx, room.id)
        assigned = await self.store.assignments(conn, [room.id])
        if new:
            ids = {m.id for m in new}
            await events.add(
                conn,
                events_pb2.ParticipantAssigned(
                    breakout_room_id=room.id,
                    assignments=[
                        convert.assignment_proto(a) for a in assigned if a.participant_id in ids
                    ],
                ),
            )
            await self._audit(
                conn,
                ctx,
                "breakout_participants_assigned",
                room.id,
                req.request_id,
                userIds=",".join(m.user_id for m in new)[:1000],
            )
        response = R.AssignParticipantsResponse(
            room=convert.room_proto(room, assigned), skipped_user_ids=skipped
        )
        return Result(response, events.records, plan)

    async def _move(
        self,
        conn: asyncpg.Connection,
        ctx: _Ctx,
        m: MemberRow,
        to: RoomRow | None,
        events: EventBatch,
        plan: MediaPlan,
        *,
        force: bool = False,
    ) -> bool:
        """Put `m` in `to` (None = main room); False when nothing changed."""
        if to is None:
            if m.room_id is None:
                return False
            await self.store.leave_current(conn, m.id)
        else:
            if m.room_id == to.id:
                if await self.store.joined_at(conn, to.id, m.id) is not None:
                    return False
                await self.store.mark_joined(conn, to.id, m.id)
            else:
                if not force and to.count + 1 > to.capacity:
                    raise _room_full(to, 1)
                await self.store.assign(
                    conn,
                    tenant_id=ctx.tenant_id,
                    session_id=ctx.session_id,
                    room_id=to.id,
                    participant_id=m.id,
                    assigned_by=ctx.principal.subject,
                    joined=True,
                )
        await events.add(
            conn,
            events_pb2.ParticipantMoved(
                participant_id=m.id,
                user_id=m.user_id,
                from_breakout_room_id=m.room_id or "",
                to_breakout_room_id=to.id if to else "",
            ),
        )
        plan.moves.append((m.user_id, to.id if to else ""))
        return True

    async def move(
        self, conn: asyncpg.Connection, principal: Principal, req: R.MoveParticipantRequest
    ) -> Result[R.MoveParticipantResponse]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = v.require_uuid("session_id", req.session_id)
        v.require_len("user_id", req.user_id, 1, MAX_ID)
        rid = (
            v.require_uuid("to_breakout_room_id", req.to_breakout_room_id)
            if (req.to_breakout_room_id)
            else ""
        )
        v.raise_if_any()
        ctx = await self._ctx(conn, principal, sid, manage=True)
        to = await self._room(conn, ctx, rid, open_=True) if rid else None
        m = await self._target(conn, ctx, req.user_id)
        events = EventBatch(ctx.tenant_id, ctx.session_id, self._actor(ctx), req.request_id)
        plan = MediaPlan(ctx.session_id, ctx.tenant_id)
        changed = await self._move(conn, ctx, m, to, events, plan)
        if changed:
            await self._audit(
                conn,
                ctx,
                "breakout_participant_moved",
                m.id,
                req.request_id,
                target_type="participant",
                userId=m.user_id,
                fromBreakoutRoomId=m.room_id or "",
                toBreakoutRoomId=to.id if to else "",
            )
        response = R.MoveParticipantResponse(from_breakout_room_id=m.room_id or "")
        if to is not None:
            to = await self._reload(conn, ctx, to.id)
            response.to_room.CopyFrom((await self._protos(conn, [to]))[0])
        return Result(response, events.records, plan)

    async def join(
        self, conn: asyncpg.Connection, principal: Principal, req: R.JoinBreakoutRoomRequest
    ) -> Result[R.JoinBreakoutRoomResponse]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = v.require_uuid("session_id", req.session_id)
        rid = (
            v.require_uuid("breakout_room_id", req.breakout_room_id)
            if (req.breakout_room_id)
            else ""
        )
        v.raise_if_any()
        ctx = await self._ctx(conn, principal, sid, manage=False)
        if ctx.me is None or ctx.me.status not in ACTIVE:
            raise PermissionDenied(
                "NOT_IN_SESSION",
                "join the session before entering a breakout room",
                metadata={"sessionId": ctx.session_id},
            )
        me = ctx.me
        if not rid:
            if me.room_id is None:
                raise FailedPrecondition(
                    "NO_ACTIVE_BREAKOUTS",
                    "you are not assigned to an open breakout room",
                    metadata={"sessionId": ctx.session_id},
                )
            rid = me.room_id
        room = await self._room(conn, ctx, rid, open_=True)
        if not ctx.manager and me.room_id != room.id:
            raise PermissionDenied(
                "PERMISSION_MISSING",
                "participants enter only the breakout room they are assigned to",
                metadata={"breakoutRoomId": room.id, "assignedBreakoutRoomId": me.room_id or ""},
            )
        events = EventBatch(ctx.tenant_id, ctx.session_id, self._actor(ctx), req.request_id)
        plan = MediaPlan(ctx.session_id, ctx.tenant_id)
        # Moderators visit any room, full or not (they do not take a learner's place).
        await self._move(conn, ctx, me, room, events, plan, force=ctx.manager)
        room = await self._reload(conn, ctx, room.id)
        response = R.JoinBreakoutRoomResponse(
            room=(await self._protos(conn, [room]))[0], router_id=room.router_id or ""
        )
        return Result(response, events.records, plan)

    async def leave(
        self, conn: asyncpg.Connection, principal: Principal, req: R.LeaveBreakoutRoomRequest
    ) -> Result[R.LeaveBreakoutRoomResponse]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = v.require_uuid("session_id", req.session_id)
        v.raise_if_any()
        ctx = await self._ctx(conn, principal, sid, manage=True)
        me = ctx.me
        if me is None or me.room_id is None:
            raise FailedPrecondition(
                "INVALID_STATE_TRANSITION",
                "you are in the main room, not in a breakout room",
                metadata={"sessionId": ctx.session_id},
            )
        events = EventBatch(ctx.tenant_id, ctx.session_id, self._actor(ctx), req.request_id)
        plan = MediaPlan(ctx.session_id, ctx.tenant_id)
        await self._move(conn, ctx, me, None, events, plan)
        response = R.LeaveBreakoutRoomResponse(
            breakout_room_id=me.room_id, router_id=ctx.session.media_router_id or ""
        )
        return Result(response, events.records, plan)

    # ================================================================ broadcast / extend

    async def broadcast(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        req: R.BroadcastToBreakoutRoomsRequest,
    ) -> Result[R.BroadcastToBreakoutRoomsResponse]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = v.require_uuid("session_id", req.session_id)
        text = neutralise(req.text).strip() if len(req.text) <= 4 * MAX_TEXT else req.text
        if not text:
            v.add("text", "is required" if not req.text else "must not be blank")
        elif len(text) > MAX_TEXT:
            v.add("text", f"length must be between 1 and {MAX_TEXT} characters")
        v.raise_if_any()
        ctx = await self._ctx(conn, principal, sid, manage=True)
        rooms = await self.store.rooms(conn, ctx.tenant_id, ctx.session_id)
        if not rooms:
            raise FailedPrecondition(
                "NO_ACTIVE_BREAKOUTS",
                "no breakout room is open to broadcast to",
                metadata={"sessionId": ctx.session_id},
            )
        events = EventBatch(ctx.tenant_id, ctx.session_id, self._actor(ctx), req.request_id)
        message = B.BreakoutBroadcastMessage(
            id=str(uuid.uuid4()),
            session_id=ctx.session_id,
            text=text,
            sender=common_pb2.Actor(
                user_id=principal.subject,
                display_name=principal.name[:100],
                role=convert.ROLES.get(principal.role, common_pb2.ROLE_UNSPECIFIED),
                kind=common_pb2.ACTOR_KIND_USER,
                participant_id=ctx.me.id if ctx.me else "",
            ),
            breakout_room_ids=[r.id for r in rooms],
        )
        message.send_time.CopyFrom(to_timestamp(datetime.now(UTC)))
        await events.add(conn, events_pb2.BreakoutBroadcast(message=message))
        return Result(R.BroadcastToBreakoutRoomsResponse(message=message), events.records)

    async def extend(
        self, conn: asyncpg.Connection, principal: Principal, req: R.ExtendBreakoutRoomsRequest
    ) -> Result[R.ExtendBreakoutRoomsResponse]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = v.require_uuid("session_id", req.session_id)
        ids = [
            v.require_uuid(f"breakout_room_ids[{i}]", r)
            for i, r in enumerate(req.breakout_room_ids[: MAX_ROOMS + 1])
        ]
        if len(req.breakout_room_ids) > MAX_ROOMS:
            v.add("breakout_room_ids", f"at most {MAX_ROOMS} rooms")
        if not req.HasField("additional"):
            v.add("additional", "is required")
            minutes = 0
        else:
            minutes = _minutes(v, "additional", req.additional, 1, MAX_EXTEND_MINUTES)
        v.raise_if_any()
        ctx = await self._ctx(conn, principal, sid, manage=True)
        if ids:
            rooms = [await self._room(conn, ctx, r, open_=True) for r in dict.fromkeys(ids)]
            for room in rooms:
                if room.time_limit_minutes is None:
                    raise InvalidArgument(
                        [("breakout_room_ids", f"room {room.name!r} has no time limit")]
                    )
        else:
            rooms = [
                r
                for r in await self.store.rooms(conn, ctx.tenant_id, ctx.session_id)
                if r.time_limit_minutes is not None
            ]
            if not rooms:
                raise FailedPrecondition(
                    "NO_ACTIVE_BREAKOUTS",
                    "no open breakout room has a time limit to extend",
                    metadata={"sessionId": ctx.session_id},
                )
        for room in rooms:
            assert room.time_limit_minutes is not None
            if room.time_limit_minutes + minutes > MAX_LIMIT_MINUTES:
                raise InvalidArgument(
                    [
                        (
                            "additional",
                            f"room {room.name!r} would run {room.time_limit_minutes + minutes} "
                            f"minutes; the limit is {MAX_LIMIT_MINUTES}",
                        )
                    ]
                )
        for room in rooms:
            await self.store.extend_room(conn, room.id, minutes)
        fresh = await self.store.rooms(
            conn, ctx.tenant_id, ctx.session_id, ids=[r.id for r in rooms]
        )
        protos = await self._protos(conn, fresh, people=False)
        events = EventBatch(ctx.tenant_id, ctx.session_id, self._actor(ctx), req.request_id)
        await events.add(
            conn,
            events_pb2.BreakoutRoomsExtended(
                rooms=protos, additional=to_duration(timedelta(minutes=minutes))
            ),
        )
        await self._audit(
            conn,
            ctx,
            "breakout_rooms_extended",
            ctx.session_id,
            req.request_id,
            target_type="session",
            minutes=minutes,
            rooms=len(fresh),
        )
        return Result(R.ExtendBreakoutRoomsResponse(rooms=protos), events.records)

    # ================================================================ close

    async def close_rooms(
        self,
        conn: asyncpg.Connection,
        rooms: Sequence[RoomRow],
        reason: str,
        events: EventBatch,
        plan: MediaPlan,
        *,
        single: bool,
    ) -> tuple[list[RoomRow], list[str]]:
        """Close `rooms` (open ones), everyone back to the main room; one event."""
        closed: list[RoomRow] = []
        returned: list[str] = []
        for room in rooms:
            users = await self.store.close_room(conn, room.id, reason)
            returned.extend(users)
            plan.moves.extend((u, "") for u in users)
            if room.router_id:
                plan.closes.append(room.router_id)
            fresh = await self.store.get_room(conn, room.tenant_id, room.id)
            assert fresh is not None
            closed.append(fresh)
        if single and closed:
            await events.add(
                conn,
                events_pb2.BreakoutRoomClosed(
                    room=convert.room_proto(closed[0]), returned_user_ids=returned
                ),
            )
        elif closed:
            await events.add(
                conn,
                events_pb2.BreakoutRoomsClosed(
                    breakout_room_ids=[r.id for r in closed],
                    returned_user_ids=sorted(returned),
                    reason=convert.CLOSE_REASONS[reason],
                ),
            )
        return closed, returned

    async def close_room(
        self, conn: asyncpg.Connection, principal: Principal, req: R.CloseBreakoutRoomRequest
    ) -> Result[R.CloseBreakoutRoomResponse]:
        v = Validator()
        _check_request_id(v, req.request_id)
        rid = v.require_uuid("breakout_room_id", req.breakout_room_id)
        v.raise_if_any()
        found = await self.store.get_room(conn, principal.tenant_id, rid)
        if found is None:
            raise NotFound("breakout_room", rid)
        ctx = await self._ctx(conn, principal, found.session_id, manage=True)
        room = await self._room(conn, ctx, rid, open_=False)
        if room.status != "open":  # closing a closed room is a success (idempotent)
            return Result(R.CloseBreakoutRoomResponse(room=convert.room_proto(room)))
        events = EventBatch(ctx.tenant_id, ctx.session_id, self._actor(ctx), req.request_id)
        plan = MediaPlan(ctx.session_id, ctx.tenant_id)
        closed, returned = await self.close_rooms(conn, [room], "manual", events, plan, single=True)
        await self._audit(conn, ctx, "breakout_room_closed", room.id, req.request_id)
        response = R.CloseBreakoutRoomResponse(
            room=convert.room_proto(closed[0]), returned_user_ids=returned
        )
        return Result(response, events.records, plan)

    async def close_all(
        self, conn: asyncpg.Connection, principal: Principal, req: R.CloseAllBreakoutRoomsRequest
    ) -> Result[R.CloseAllBreakoutRoomsResponse]:
        v = Validator()
        _check_request_id(v, req.request_id)
        sid = v.require_uuid("session_id", req.session_id)
        v.raise_if_any()
        ctx = await self._ctx(conn, principal, sid, manage=True)
        rooms = await self.store.rooms(conn, ctx.tenant_id, ctx.session_id)
        events = EventBatch(ctx.tenant_id, ctx.session_id, self._actor(ctx), req.request_id)
        plan = MediaPlan(ctx.session_id, ctx.tenant_id)
        closed, returned = await self.close_rooms(
            conn, rooms, "all_closed", events, plan, single=False
        )
        if closed:
            await self._audit(
                conn,
                ctx,
                "breakout_rooms_closed",
                ctx.session_id,
                req.request_id,
                target_type="session",
                rooms=len(closed),
            )
        response = R.CloseAllBreakoutRoomsResponse(
            rooms=[convert.room_proto(r) for r in closed], returned_user_ids=sorted(returned)
        )
        return Result(response, events.records, plan)

    # ================================================================ sweeper

    async def sweep_session(
        self, conn: asyncpg.Connection, tenant_id: str, session_id: str
    ) -> Result[int]:
        """Close the session's rooms whose time is up (or all, once the session is no
        longer live), as the system. Skips a session whose row another transaction holds
        (FOR UPDATE SKIP LOCKED): the next pass, or another instance, takes it."""
        status = await self.store.lock_session_nowait(conn, tenant_id, session_id)
        plan = MediaPlan(session_id, tenant_id)
        if status is None:
            return Result(0, [], plan)
        rooms = await self.store.rooms(conn, tenant_id, session_id)
        if status == "live":
            now = await conn.fetchval("SELECT now()")
            rooms = [r for r in rooms if r.closes_at is not None and r.closes_at <= now]
            reason = "time_limit"
        else:
            reason = "session_ended"
        events = EventBatch(tenant_id, session_id, self.system_actor(), None)
        for room in rooms:
            if reason == "time_limit":
                await self.close_rooms(conn, [room], reason, events, plan, single=True)
        if reason == "session_ended" and rooms:
            await self.close_rooms(conn, rooms, reason, events, plan, single=False)
            plan.moves.clear()  # the session is over: MediaService closed its routers
        return Result(len(rooms), events.records, plan)

    # ================================================================ watch

    async def plan_watch(
        self, conn: asyncpg.Connection, principal: Principal, session_id: str, after_seq: int
    ) -> tuple[str, bool]:
        """(session id, whether the session is over) after the caller's checks."""
        v = Validator()
        sid = v.require_uuid("session_id", session_id)
        v.require_range("after_seq", after_seq, 0, 2**63 - 1)
        v.raise_if_any()
        ctx = await self._ctx(conn, principal, sid, manage=False, mutate=False)
        return ctx.session_id, ctx.session.status in ("ended", "cancelled")


async def close_rooms_for_session_end(
    conn: asyncpg.Connection, tenant_id: str, session_id: str, events: EventBatch
) -> int:
    """EndSession's step (its transaction, under its session row lock): close every open
    breakout room, reason SESSION_ENDED, one `breakout_rooms_closed` event before the
    session's `session_ended`. MediaService closes the routers itself on the session's end."""
    service = BreakoutService()
    rooms = await service.store.rooms(conn, tenant_id, session_id)
    if rooms:
        await service.close_rooms(conn, rooms, "session_ended", events, MediaPlan(), single=False)
    return len(rooms)
