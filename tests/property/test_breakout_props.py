"""Breakout rooms as hypothesis properties, through a real `classmesh up` (real gRPC,
PostgreSQL, Redis; one mesh for the module, a fresh live class per example).

Random interleavings of create / assign / move / join (a student enters their room) /
visit and leave (the instructor) / close / close-all run against a model that predicts every
answer. After every step the tables and the API agree with the model:

  * a participant is in at most one open room, and a closed room holds nobody;
  * capacity is exact: a room never shows more than `capacity` participants, an assign or
    move that would overfill it is RESOURCE_EXHAUSTED ROOM_FULL and changes nothing, and a
    visiting moderator does not take a learner's seat;
  * ListBreakoutRooms shows the model's members of every open room.

At the end of every example:

  * folding the log (`session_events`: created, assigned, moved, closed) gives the same
    membership as the tables;
  * seed 003 property 35 (namespace isolation): every student posts a chat message into
    the room they are in; each room's feed carries exactly the messages of its own members
    and none of another room's (nor of the main room).

A second property sends batches of the same steps at once (the server orders them): no
refusal outside the expected ones (never UNKNOWN, INTERNAL or a constraint violation),
capacity exact, at most one open room per participant, the API equal to the tables, and the
folded log equal to the tables.

Every wait is bounded (feeds by `Feed.wait_count`'s timeout, each example by
`asyncio.timeout`), every feed is stopped and every client closed when the example ends.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from classmesh.breakout.v1 import breakout_pb2, breakout_service_pb2
from classmesh_sdk import ClassMeshError
from tests.support.classroom import (
    DOMAIN,
    Code,
    Feed,
    Klass,
    Mesh,
    classroom_mesh,
    db_events,
    kind,
    live_class,
    scope,
)

B = breakout_pb2
STUDENTS = 4
MAIN = ""
EXAMPLE_TIMEOUT = 30.0


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with classroom_mesh(
        admin_database_url, redis_url, tmp_path_factory, "breakout-props"
    ) as m:
        yield m


# ------------------------------------------------------------------------------ model


@dataclass
class Room:
    id: str
    capacity: int
    open: bool = True


@dataclass
class Model:
    teacher: str
    students: list[str]
    rooms: list[Room] = field(default_factory=list)
    #: user id -> open room id; users in the main room are absent.
    where: dict[str, str] = field(default_factory=dict)

    def open_rooms(self) -> list[Room]:
        return [r for r in self.rooms if r.open]

    def members(self, room_id: str) -> set[str]:
        return {u for u, r in self.where.items() if r == room_id}

    def seats(self, room_id: str) -> int:
        """Seats taken: a visiting instructor does not take a learner's place."""
        return len(self.members(room_id) - {self.teacher})

    def room(self, index: int) -> Room | None:
        return self.rooms[index % len(self.rooms)] if self.rooms else None


async def _outcome(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except ClassMeshError as exc:
        assert exc.domain == DOMAIN, exc
        return exc


def _refused(outcome: Any, code: Code, reason: str) -> None:
    assert isinstance(outcome, ClassMeshError), f"expected {code.name} {reason}, got {outcome}"
    assert (outcome.code, outcome.reason) == (code, reason), outcome


def _ok(outcome: Any) -> Any:
    assert not isinstance(outcome, ClassMeshError), outcome
    return outcome


# ------------------------------------------------------------------------------ steps


async def _create(
    klass: Klass, m: Model, placement: list[int], count: int, capacity: int, move_now: bool
) -> None:
    groups: list[list[str]] = [[] for _ in range(count)]
    for u, i in zip(m.students, placement, strict=True):
        if 0 <= i < count:
            groups[i].append(u)
    specs = [B.BreakoutRoomSpec(capacity=capacity, user_ids=g) for g in groups]
    out = await _outcome(
        klass.inst.breakouts.create_breakout_rooms(
            session_id=klass.id,
            explicit=breakout_service_pb2.ExplicitRooms(rooms=specs),
            move_immediately=move_now,
            retry=None,
        )
    )
    if any(len(g) > capacity for g in groups):
        _refused(out, Code.INVALID_ARGUMENT, "VALIDATION_FAILED")
        event("create: overfull spec")
        return
    if m.open_rooms():
        _refused(out, Code.FAILED_PRECONDITION, "BREAKOUTS_ACTIVE")
        event("create: rooms active")
        return
    resp = _ok(out)
    event("create: ok")
    assert len(resp.rooms) == count and not resp.skipped_user_ids
    for room, g in zip(resp.rooms, groups, strict=True):
        assert room.capacity == capacity and room.status == B.BREAKOUT_ROOM_STATUS_OPEN
        assert sorted(p.user_id for p in room.participants) == sorted(g)
        m.rooms.append(Room(room.id, capacity))
        for u in g:
            m.where[u] = room.id
    placed = {u for g in groups for u in g}
    assert sorted(resp.unassigned_user_ids) == sorted(set(m.students) - placed)


async def _assign(klass: Klass, m: Model, index: int, who: list[int]) -> None:
    room = m.room(index)
    if room is None:
        return
    users = [m.students[i] for i in who]
    out = await _outcome(
        klass.inst.breakouts.assign_participants(
            session_id=klass.id, breakout_room_id=room.id, user_ids=users, retry=None
        )
    )
    if not room.open:
        _refused(out, Code.FAILED_PRECONDITION, "BREAKOUT_ROOM_CLOSED")
        event("assign: closed room")
        return
    new = [u for u in users if m.where.get(u) != room.id]
    if m.seats(room.id) + len(new) > room.capacity:
        _refused(out, Code.RESOURCE_EXHAUSTED, "ROOM_FULL")
        event("assign: full")
        return
    resp = _ok(out)
    event("assign: ok")
    for u in users:
        m.where[u] = room.id
    assert {p.user_id for p in resp.room.participants} == m.members(room.id)


async def _move(klass: Klass, m: Model, user: int, index: int) -> None:
    u = m.students[user]
    room = m.room(index) if index >= 0 else None
    out = await _outcome(
        klass.inst.breakouts.move_participant(
            session_id=klass.id, user_id=u, to_breakout_room_id=room.id if room else "", retry=None
        )
    )
    before = m.where.get(u, MAIN)
    if room is None:
        resp = _ok(out)
        event("move: to main")
        m.where.pop(u, None)
    elif not room.open:
        _refused(out, Code.FAILED_PRECONDITION, "BREAKOUT_ROOM_CLOSED")
        event("move: closed room")
        return
    elif before != room.id and m.seats(room.id) + 1 > room.capacity:
        _refused(out, Code.RESOURCE_EXHAUSTED, "ROOM_FULL")
        event("move: full")
        return
    else:
        resp = _ok(out)
        event("move: ok")
        m.where[u] = room.id
        assert resp.to_room.id == room.id
    assert resp.from_breakout_room_id == before


async def _join(klass: Klass, m: Model, user: int) -> None:
    u = m.students[user]
    out = await _outcome(
        klass.students[u].breakouts.join_breakout_room(session_id=klass.id, retry=None)
    )
    if u not in m.where:
        _refused(out, Code.FAILED_PRECONDITION, "NO_ACTIVE_BREAKOUTS")
        event("join: not assigned")
        return
    resp = _ok(out)
    event("join: ok")
    assert resp.room.id == m.where[u] and resp.router_id


async def _visit(klass: Klass, m: Model, index: int) -> None:
    room = m.room(index)
    if room is None:
        return
    out = await _outcome(
        klass.inst.breakouts.join_breakout_room(
            session_id=klass.id, breakout_room_id=room.id, retry=None
        )
    )
    if not room.open:
        _refused(out, Code.FAILED_PRECONDITION, "BREAKOUT_ROOM_CLOSED")
        event("visit: closed room")
        return
    resp = _ok(out)
    event("visit: ok")
    m.where[m.teacher] = room.id
    assert resp.room.id == room.id
    assert resp.room.participant_count == m.seats(room.id)


async def _leave(klass: Klass, m: Model) -> None:
    out = await _outcome(klass.inst.breakouts.leave_breakout_room(session_id=klass.id, retry=None))
    if m.teacher not in m.where:
        _refused(out, Code.FAILED_PRECONDITION, "INVALID_STATE_TRANSITION")
        event("leave: in main")
        return
    resp = _ok(out)
    event("leave: ok")
    assert resp.breakout_room_id == m.where.pop(m.teacher)


async def _close(klass: Klass, m: Model, index: int) -> None:
    room = m.room(index)
    if room is None:
        return
    resp = _ok(
        await _outcome(
            klass.inst.breakouts.close_breakout_room(breakout_room_id=room.id, retry=None)
        )
    )
    event(f"close: {'open' if room.open else 'closed'} room")
    assert resp.room.status == B.BREAKOUT_ROOM_STATUS_CLOSED
    assert sorted(resp.returned_user_ids) == sorted(m.members(room.id))
    room.open = False
    m.where = {u: r for u, r in m.where.items() if r != room.id}


async def _close_all(klass: Klass, m: Model) -> None:
    resp = _ok(
        await _outcome(
            klass.inst.breakouts.close_all_breakout_rooms(session_id=klass.id, retry=None)
        )
    )
    event("close all")
    assert sorted(r.id for r in resp.rooms) == sorted(r.id for r in m.open_rooms())
    assert sorted(resp.returned_user_ids) == sorted(m.where)
    for r in m.rooms:
        r.open = False
    m.where.clear()


# ------------------------------------------------------------------------------ checks


async def _table_membership(mesh: Mesh, session_id: str) -> dict[str, str]:
    """user id -> open room, from the tables; at most one open room per participant."""
    rows = await mesh.pool.fetch(
        "SELECT p.user_id, ra.breakout_room_id, b.status::text AS status "
        "FROM room_assignments ra JOIN session_participants p ON p.id = ra.participant_id "
        "JOIN breakout_rooms b ON b.id = ra.breakout_room_id "
        "WHERE ra.session_id = $1 AND ra.left_at IS NULL",
        uuid.UUID(session_id),
    )
    assert all(r["status"] == "open" for r in rows), "a closed room still holds someone"
    users = [r["user_id"] for r in rows]
    assert len(users) == len(set(users)), f"a participant in two open rooms: {rows}"
    return {r["user_id"]: str(r["breakout_room_id"]) for r in rows}


async def _check(mesh: Mesh, klass: Klass, m: Model) -> None:
    assert await _table_membership(mesh, klass.id) == m.where
    listed = await klass.inst.breakouts.list_breakout_rooms(
        session_id=klass.id, include_participants=True, page_size=100
    )
    assert sorted(r.id for r in listed.rooms) == sorted(r.id for r in m.open_rooms())
    for r in listed.rooms:
        assert {p.user_id for p in r.participants} == m.members(r.id)
        assert 0 <= r.participant_count <= r.capacity, r
        assert r.participant_count == m.seats(r.id)


async def _fold_log(mesh: Mesh, session_id: str) -> dict[str, str]:
    """Membership rebuilt from the breakout events of `session_events`."""
    where: dict[str, str] = {}
    for row in await db_events(mesh.pool, session_id):
        p = row["payload"]
        p = json.loads(p) if isinstance(p, str) else p
        t = row["type"]
        if t == "breakout_rooms_created":
            for room in p.get("rooms", []):
                for a in room.get("participants", []):
                    where[a["user_id"]] = room["id"]
        elif t == "participant_assigned":
            for a in p.get("assignments", []):
                where[a["user_id"]] = p["breakout_room_id"]
        elif t == "participant_moved":
            to = p.get("to_breakout_room_id", "")
            if to:
                where[p["user_id"]] = to
            else:
                where.pop(p["user_id"], None)
        elif t in ("breakout_room_closed", "breakout_rooms_closed"):
            ids = {p["room"]["id"]} if t == "breakout_room_closed" else set(p["breakout_room_ids"])
            returned = {u for u, r in where.items() if r in ids}
            assert returned == set(p.get("returned_user_ids", [])), (t, p, where)
            where = {u: r for u, r in where.items() if r not in ids}
    return where


async def _isolation(mesh: Mesh, klass: Klass, m: Model) -> None:
    """Property 35: a room's feed carries its own members' chat, nobody else's."""
    scopes = {r.id: m.members(r.id) for r in m.open_rooms()}
    scopes[MAIN] = set(m.students) - set(m.where)
    feeds: dict[str, Feed] = {}
    # Feeds replay from here: what earlier rounds posted is not part of this round.
    after = await mesh.pool.fetchval(
        "SELECT coalesce(max(seq), 0) FROM session_events WHERE session_id = $1",
        uuid.UUID(klass.id),
    )
    try:
        for room_id, users in scopes.items():
            if room_id and users - {m.teacher}:
                reader = sorted(users - {m.teacher})[0]
                feeds[room_id] = Feed(klass.students[reader], klass.id, room_id, after_seq=after)
        if scopes[MAIN]:
            feeds[MAIN] = Feed(klass.students[sorted(scopes[MAIN])[0]], klass.id, after_seq=after)
        for u in m.students:
            room_id = m.where.get(u, MAIN)
            # A participant cannot speak into a room they are not in...
            elsewhere = next((r for r in scopes if r != room_id), None)
            if elsewhere is not None:
                out = await _outcome(
                    klass.students[u].interaction.send_chat_message(
                        scope=scope(klass.id, elsewhere), text=f"stray {u}", retry=None
                    )
                )
                _refused(out, Code.PERMISSION_DENIED, "PERMISSION_MISSING")
            # ...and speaks into their own.
            await klass.students[u].interaction.send_chat_message(
                scope=scope(klass.id, room_id), text=f"from {u}"
            )
        for room_id, feed in feeds.items():
            posters = scopes[room_id] - {m.teacher}
            got = await feed.wait_count("chat_message_posted", len(posters), timeout=10)
            await feed.quiet(0.2)
            got = feed.of("chat_message_posted")
            assert {e.breakout_room_id for e in got} == {room_id}, [kind(e) for e in got]
            senders = sorted(e.chat_message_posted.message.sender.user_id for e in got)
            assert senders == sorted(posters), (room_id, senders, posters)
            assert all(e.chat_message_posted.message.text.startswith("from ") for e in got)
        event(f"isolation: {len(feeds)} feeds")
    finally:
        for feed in feeds.values():
            await feed.stop()


# ------------------------------------------------------------------------------ property

room_index = st.integers(0, 5)
#: Room (0-2) of each student; -1 = the main room.
placement = st.lists(st.integers(-1, 2), min_size=STUDENTS, max_size=STUDENTS)
step = st.one_of(
    st.tuples(
        st.just("create"),
        placement,
        st.integers(1, 3),
        st.integers(2, 3),
        st.booleans(),
    ),
    st.tuples(
        st.just("assign"),
        room_index,
        st.lists(st.integers(0, STUDENTS - 1), min_size=1, max_size=3, unique=True),
    ),
    st.tuples(st.just("move"), st.integers(0, STUDENTS - 1), st.integers(-1, 5)),
    st.tuples(st.just("join"), st.integers(0, STUDENTS - 1)),
    st.tuples(st.just("visit"), room_index),
    st.tuples(st.just("leave")),
    st.tuples(st.just("close"), room_index),
    st.tuples(st.just("close_all")),
)
op_strategy = st.lists(step, min_size=2, max_size=10)


async def _run(mesh: Mesh, ops: list[tuple[Any, ...]], final: list[int], visit: int) -> None:
    klass = await live_class(mesh, students=STUDENTS)
    m = Model(klass.teacher, sorted(klass.students))
    # Always start with rooms, so most steps meet open rooms.
    await _create(klass, m, [i % 2 for i in range(STUDENTS)], 2, 2, True)
    for op in ops:
        name = op[0]
        if name == "create":
            await _create(klass, m, op[1], op[2], op[3], op[4])
        elif name == "assign":
            await _assign(klass, m, op[1], op[2])
        elif name == "move":
            await _move(klass, m, op[1], op[2])
        elif name == "join":
            await _join(klass, m, op[1])
        elif name == "visit":
            await _visit(klass, m, op[1])
        elif name == "leave":
            await _leave(klass, m)
        elif name == "close":
            await _close(klass, m, op[1])
        else:
            await _close_all(klass, m)
        await _check(mesh, klass, m)
    assert await _fold_log(mesh, klass.id) == await _table_membership(mesh, klass.id)
    await _isolation(mesh, klass, m)
    # Property 35 again on a drawn spread over three open rooms (with a visiting teacher).
    await _close_all(klass, m)
    await _create(klass, m, final, 3, STUDENTS, True)
    if visit >= 0:
        await _visit(klass, m, len(m.rooms) - 3 + visit)
    await _check(mesh, klass, m)
    assert await _fold_log(mesh, klass.id) == await _table_membership(mesh, klass.id)
    await _isolation(mesh, klass, m)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
@given(ops=op_strategy, final=placement, visit=st.integers(-1, 2))
async def test_breakout_rooms_follow_the_model(
    mesh: Mesh, ops: list[tuple[Any, ...]], final: list[int], visit: int
) -> None:
    try:
        async with asyncio.timeout(EXAMPLE_TIMEOUT):
            await _run(mesh, ops, final, visit)
    finally:
        await mesh.close_clients()


# ------------------------------------------------------------------------------ concurrency

#: Refusals a concurrent step may meet (anything else, UNKNOWN or INTERNAL above all, fails).
ALLOWED = {
    (Code.RESOURCE_EXHAUSTED, "ROOM_FULL"),
    (Code.FAILED_PRECONDITION, "BREAKOUT_ROOM_CLOSED"),
    (Code.FAILED_PRECONDITION, "BREAKOUTS_ACTIVE"),
    (Code.FAILED_PRECONDITION, "NO_ACTIVE_BREAKOUTS"),
    (Code.FAILED_PRECONDITION, "INVALID_STATE_TRANSITION"),
    (Code.INVALID_ARGUMENT, "VALIDATION_FAILED"),
}


async def _fire(klass: Klass, students: list[str], rooms: list[str], op: tuple[Any, ...]) -> Any:
    """One step without a model (its answer depends on what runs beside it)."""
    b = klass.inst.breakouts
    sid = klass.id
    name = op[0]
    room = rooms[op[1] % len(rooms)] if len(op) > 1 and isinstance(op[1], int) else ""
    if name == "create":
        groups: list[list[str]] = [[] for _ in range(op[2])]
        for u, i in zip(students, op[1], strict=True):
            if 0 <= i < op[2]:
                groups[i].append(u)
        specs = [B.BreakoutRoomSpec(capacity=op[3], user_ids=g) for g in groups]
        call: Awaitable[Any] = b.create_breakout_rooms(
            session_id=sid, explicit=breakout_service_pb2.ExplicitRooms(rooms=specs), retry=None
        )
    elif name == "assign":
        users = [students[i] for i in op[2]]
        call = b.assign_participants(
            session_id=sid, breakout_room_id=room, user_ids=users, retry=None
        )
    elif name == "move":
        to = rooms[op[2] % len(rooms)] if op[2] >= 0 else ""
        call = b.move_participant(
            session_id=sid, user_id=students[op[1]], to_breakout_room_id=to, retry=None
        )
    elif name == "join":
        call = klass.students[students[op[1]]].breakouts.join_breakout_room(
            session_id=sid, retry=None
        )
    elif name == "visit":
        call = b.join_breakout_room(session_id=sid, breakout_room_id=room, retry=None)
    elif name == "leave":
        call = b.leave_breakout_room(session_id=sid, retry=None)
    elif name == "close":
        call = b.close_breakout_room(breakout_room_id=room, retry=None)
    else:
        call = b.close_all_breakout_rooms(session_id=sid, retry=None)
    out = await _outcome(call)
    if isinstance(out, ClassMeshError):
        assert (out.code, out.reason) in ALLOWED, (op, out)
        event(f"concurrent {name}: {out.reason}")
    else:
        event(f"concurrent {name}: ok")
    return out


async def _invariants(mesh: Mesh, klass: Klass, students: list[str]) -> None:
    where = await _table_membership(mesh, klass.id)
    capacity = {
        str(r["id"]): r["capacity"]
        for r in await mesh.pool.fetch(
            "SELECT id, capacity FROM breakout_rooms WHERE session_id = $1 AND status = 'open'",
            uuid.UUID(klass.id),
        )
    }
    listed = await klass.inst.breakouts.list_breakout_rooms(
        session_id=klass.id, include_participants=True, page_size=100
    )
    assert {r.id for r in listed.rooms} == set(capacity)
    for r in listed.rooms:
        learners = {u for u, room in where.items() if room == r.id and u in students}
        assert len(learners) <= capacity[r.id], (r.id, learners)
        assert r.participant_count == len(learners), r
        assert {p.user_id for p in r.participants} == {u for u, x in where.items() if x == r.id}


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
@given(batches=st.lists(st.lists(step, min_size=2, max_size=5), max_size=4))
async def test_concurrent_steps_keep_capacity_and_one_room(
    mesh: Mesh, batches: list[list[tuple[Any, ...]]]
) -> None:
    """Steps sent at once (the server decides their order): capacity stays exact, nobody is
    in two open rooms, the API shows the tables, and the folded log equals the tables."""
    try:
        async with asyncio.timeout(EXAMPLE_TIMEOUT):
            klass = await live_class(mesh, students=STUDENTS)
            students = sorted(klass.students)
            created = await klass.inst.breakouts.create_breakout_rooms(
                session_id=klass.id,
                explicit=breakout_service_pb2.ExplicitRooms(
                    rooms=[
                        B.BreakoutRoomSpec(capacity=2, user_ids=students[:2]),
                        B.BreakoutRoomSpec(capacity=2, user_ids=students[2:3]),
                    ]
                ),
            )
            rooms = [r.id for r in created.rooms]
            for batch in batches:
                outs = await asyncio.gather(*(_fire(klass, students, rooms, op) for op in batch))
                for op, out in zip(batch, outs, strict=True):
                    if op[0] == "create" and not isinstance(out, ClassMeshError):
                        rooms.extend(r.id for r in out.rooms)
                await _invariants(mesh, klass, students)
            assert await _fold_log(mesh, klass.id) == await _table_membership(mesh, klass.id)
    finally:
        await mesh.close_clients()
