"""Seed 003 correctness properties 1-11, 24, 25 and 31-34 as hypothesis properties.

Random sequences of join / leave / kick run against a real `classmesh up` (real gRPC, real
PostgreSQL, real Redis) on a fresh small study room per example. A model (who is seated,
who was removed, how many visits each user finished) predicts every answer; after each step
the API and the database must both agree with it:

  1  the room list carries name, capacity, current_occupancy, available_spots
  2  available_spots == capacity - current_occupancy
  3  a join into a full room is RESOURCE_EXHAUSTED ROOM_FULL
  4  a successful join raises occupancy by exactly 1 (a repeat join by a seated user: 0)
  5  a join creates an admitted participant row with the right user and room
  6  a refused join leaves no partial change (no row, no occupancy change)
  7  N free seats, N+K concurrent joins: exactly N succeed
  8  leave without participation is refused
  9  a leave lowers occupancy by exactly 1
  10 a leave marks the participant row inactive (left)
  11 occupancy never below 0 (nor above capacity)
  24 a kick removes the participant, frees the seat, and the user cannot come back
  25 a new room defaults to capacity 50 and occupancy 0
  31 the join timestamp is within 1 s of the join
  32 a visit's duration is leave - join within 1 s
  33 every leave (and kick) writes one session log row
  34 log queries by user, room and date range return exactly the matching rows
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from classmesh.session.v1 import session_pb2
from classmesh_sdk import NO_RETRY, ClassMeshClient, ClassMeshError
from tests.e2e.test_session_lifecycle import (
    SEATED,
    STUDY_ROOM,
    Code,
    S,
    SessionMesh,
    create_session,
    db_participants,
    now,
    session_mesh,
    time_range,
    uid,
)

USERS = 4
PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)


@pytest.fixture(scope="module")
async def sm(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SessionMesh]:
    async with session_mesh(
        admin_database_url,
        redis_url,
        tmp_path_factory,
        "properties",
        {"CLASSMESH_RATE_LIMIT_PER_MINUTE": "0"},
    ) as m:
        yield m


@pytest.fixture(scope="module")
async def admin(sm: SessionMesh) -> AsyncIterator[ClassMeshClient]:
    """Not one of `sm`'s tracked clients: examples close those, this one lives on."""
    async with ClassMeshClient(sm.target, token=sm.token("prop-admin", "admin")) as c:
        yield c


@dataclass
class Model:
    capacity: int
    seated: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    ever: set[str] = field(default_factory=set)
    visits: dict[str, int] = field(default_factory=dict)


async def _check_room(sm: SessionMesh, admin: ClassMeshClient, sid: str, m: Model) -> None:
    got = (await admin.sessions.get_session(session_id=sid)).session
    assert got.current_occupancy == len(m.seated)  # occupancy == seated count
    assert 0 <= got.current_occupancy <= m.capacity  # 11
    assert got.available_spots == m.capacity - got.current_occupancy  # 2
    row = await sm.pool.fetchrow(
        "SELECT s.current_occupancy, s.capacity, (SELECT count(*) FROM session_participants p "
        "WHERE p.session_id = s.id AND p.status::text = ANY($2::text[])) AS seated "
        "FROM sessions s WHERE s.id = $1",
        uuid.UUID(sid),
        list(SEATED),
    )
    assert row is not None
    assert (row["current_occupancy"], row["seated"], row["capacity"]) == (
        len(m.seated),
        len(m.seated),
        m.capacity,
    )
    rows = await db_participants(sm.pool, sid)
    assert {u for u, r in rows.items() if r["status"] in SEATED} == m.seated
    assert {u for u, r in rows.items() if r["status"] == "removed"} == m.removed
    assert set(rows) == m.ever  # 6: refused joins leave no row


async def _error(call: object) -> ClassMeshError | None:
    try:
        await call  # type: ignore[misc]
    except ClassMeshError as exc:
        return exc
    return None


def _label(outcome: object) -> str:
    return f"refused {outcome.reason}" if isinstance(outcome, ClassMeshError) else "ok"


op_strategy = st.lists(
    st.tuples(st.sampled_from(["join", "join", "leave", "kick"]), st.integers(0, USERS - 1)),
    min_size=3,
    max_size=16,
)


@PROPERTY_SETTINGS
@given(capacity=st.integers(1, 3), ops=op_strategy)
async def test_random_join_leave_kick_sequences(
    sm: SessionMesh, admin: ClassMeshClient, capacity: int, ops: list[tuple[str, int]]
) -> None:
    room = await create_session(admin, kind=STUDY_ROOM, capacity=capacity)
    sid = room.id
    users = [uid("p") for _ in range(USERS)]
    clients = {u: sm.as_user(u, name=f"User {u}") for u in users}
    m = Model(capacity)
    started = now()
    for op, i in ops:
        u = users[i]
        seated_now = sorted(m.seated)
        if op != "join" and i < len(seated_now):
            u = seated_now[i]  # leaves and kicks mostly hit someone who is in the room
        c = clients[u]
        if op == "join":
            t0 = now()
            outcome: object
            try:
                outcome = await c.sessions.join_session(session_id=sid, retry=NO_RETRY)
            except ClassMeshError as exc:
                outcome = exc
            t1 = now()
            event(f"join: {_label(outcome)}")
            if u in m.removed:
                assert isinstance(outcome, ClassMeshError), "removed user rejoined"
                assert (outcome.code, outcome.reason) == (
                    Code.PERMISSION_DENIED,
                    "PARTICIPANT_REMOVED",
                )
            elif u in m.seated:
                assert not isinstance(outcome, ClassMeshError), outcome
            elif len(m.seated) >= capacity:
                assert isinstance(outcome, ClassMeshError), "joined a full room"  # 3
                assert (outcome.code, outcome.reason) == (Code.RESOURCE_EXHAUSTED, "ROOM_FULL")
            else:
                assert not isinstance(outcome, ClassMeshError), outcome
                p = outcome.participant  # type: ignore[attr-defined]
                assert outcome.status == S.PARTICIPANT_STATUS_ADMITTED  # type: ignore[attr-defined]
                assert (p.user_id, p.session_id) == (u, sid)  # 5
                if u not in m.ever:  # 31: first join time within 1 s
                    joined = p.joined_at.ToDatetime(tzinfo=t0.tzinfo)
                    assert t0 - timedelta(seconds=1) <= joined <= t1 + timedelta(seconds=1)
                m.seated.add(u)
                m.ever.add(u)
                row = (await db_participants(sm.pool, sid))[u]
                assert row["status"] == "admitted"  # 5
        elif op == "leave":
            t0 = now()
            try:
                outcome = await c.sessions.leave_session(session_id=sid, retry=NO_RETRY)
            except ClassMeshError as exc:
                outcome = exc
            t1 = now()
            event(f"leave: {_label(outcome)}")
            if u in m.removed:
                assert isinstance(outcome, ClassMeshError)
                assert (outcome.code, outcome.reason) == (
                    Code.PERMISSION_DENIED,
                    "PARTICIPANT_REMOVED",
                )
            elif u not in m.seated:  # 8
                assert isinstance(outcome, ClassMeshError), "left without participating"
                assert (outcome.code, outcome.reason) == (Code.NOT_FOUND, "NOT_FOUND"), outcome
            else:
                assert not isinstance(outcome, ClassMeshError), outcome
                assert outcome.participant.status == S.PARTICIPANT_STATUS_LEFT  # type: ignore[attr-defined]
                visit = outcome.visit_duration.ToTimedelta().total_seconds()  # type: ignore[attr-defined]
                assert 0 <= visit <= (t1 - started).total_seconds() + 1  # 32
                m.seated.discard(u)
                m.visits[u] = m.visits.get(u, 0) + 1
                row = (await db_participants(sm.pool, sid))[u]
                assert row["status"] == "left"  # 10
        else:  # kick
            if u not in m.seated:
                continue
            event("kick")
            resp = await admin.sessions.remove_participant(session_id=sid, user_id=u, reason="p")
            assert resp.participant.status == S.PARTICIPANT_STATUS_REMOVED  # 24
            m.seated.discard(u)
            m.removed.add(u)
            m.visits[u] = m.visits.get(u, 0) + 1
        await _check_room(sm, admin, sid, m)

    # 1: the room list shows the room with all fields.
    listed = await _find_room(admin, sid)
    assert listed.name == room.title and listed.name
    assert (listed.capacity, listed.current_occupancy, listed.available_spots) == (
        capacity,
        len(m.seated),
        capacity - len(m.seated),
    )
    # 33/34: one log row per finished visit; queries match exactly.
    for u in users:
        resp = await admin.sessions.list_study_room_logs(session_id=sid, user_id=u, page_size=500)
        assert len(resp.logs) == m.visits.get(u, 0), u
        assert all((x.session_id, x.user_id) == (sid, u) for x in resp.logs)
        for x in resp.logs:
            d = x.duration.ToTimedelta().total_seconds()
            span = (x.left_at.ToDatetime() - x.joined_at.ToDatetime()).total_seconds()
            assert d >= 0 and abs(d - span) <= 1  # 32
            assert x.kind == S.STUDY_ROOM_LOG_KIND_VISIT
            assert x.detail in ("left", "removed")
    by_room = await admin.sessions.list_study_room_logs(session_id=sid, page_size=500)
    assert by_room.total_size == sum(m.visits.values())
    assert {x.session_id for x in by_room.logs} <= {sid}
    window = await admin.sessions.list_study_room_logs(
        session_id=sid, time_range=time_range(started, now() + timedelta(seconds=1))
    )
    assert window.total_size == by_room.total_size
    before = await admin.sessions.list_study_room_logs(
        session_id=sid, time_range=time_range(None, started - timedelta(seconds=1))
    )
    assert before.total_size == 0
    await sm.close_clients()


async def _find_room(admin: ClassMeshClient, sid: str) -> session_pb2.StudyRoom:
    token = ""
    while True:
        resp = await admin.sessions.list_study_rooms(page_size=100, page_token=token)
        for r in resp.rooms:
            if r.session_id == sid:
                return r
        token = resp.next_page_token
        if not token:
            raise AssertionError(f"room {sid} missing from ListStudyRooms")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(1, 5), extra=st.integers(1, 6), seated=st.integers(0, 2))
async def test_concurrent_joins_admit_exactly_the_free_seats(
    sm: SessionMesh, admin: ClassMeshClient, capacity: int, extra: int, seated: int
) -> None:
    """Property 7: N free seats and N+K concurrent joins -> exactly N succeed."""
    seated = min(seated, capacity)
    room = await create_session(admin, kind=STUDY_ROOM, capacity=capacity)
    for _ in range(seated):
        await sm.as_user(uid("pre")).sessions.join_session(session_id=room.id)
    free = capacity - seated
    racers = [sm.as_user(uid("race")) for _ in range(free + extra)]
    results = await asyncio.gather(
        *(_error(c.sessions.join_session(session_id=room.id, retry=NO_RETRY)) for c in racers)
    )
    errors = [e for e in results if e is not None]
    assert len(results) - len(errors) == free
    assert len(errors) == extra
    assert {(e.code, e.reason) for e in errors} == {(Code.RESOURCE_EXHAUSTED, "ROOM_FULL")}
    got = (await admin.sessions.get_session(session_id=room.id)).session
    assert (got.current_occupancy, got.available_spots) == (capacity, 0)
    await sm.close_clients()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(2, 6), seated=st.integers(0, 5))
async def test_join_then_leave_restores_the_room(
    sm: SessionMesh, admin: ClassMeshClient, capacity: int, seated: int
) -> None:
    seated = min(seated, capacity - 1)
    room = await create_session(admin, kind=STUDY_ROOM, capacity=capacity)
    for _ in range(seated):
        await sm.as_user(uid("pre")).sessions.join_session(session_id=room.id)

    async def snapshot() -> tuple[object, ...]:
        s = (await admin.sessions.get_session(session_id=room.id)).session
        rows = await db_participants(sm.pool, room.id)
        seats = frozenset(u for u, r in rows.items() if r["status"] in SEATED)
        return s.current_occupancy, s.available_spots, seats

    before = await snapshot()
    visitor = sm.as_user(uid("visitor"))
    joined = await visitor.sessions.join_session(session_id=room.id)
    mid = await snapshot()
    assert mid[0] == before[0] + 1 and mid[1] == before[1] - 1  # 4 and 2
    await visitor.sessions.leave_session(session_id=room.id)
    assert await snapshot() == before
    assert joined.participant.user_id not in before[2]  # type: ignore[operator]
    await sm.close_clients()


async def test_new_rooms_default_to_fifty_seats_and_empty(
    sm: SessionMesh, admin: ClassMeshClient
) -> None:
    """Property 25 (and 1) for created rooms and for seeded ones."""
    room = await create_session(admin, kind=STUDY_ROOM)
    assert (room.capacity, room.current_occupancy, room.available_spots) == (50, 0, 50)
    row = await sm.pool.fetchrow("SELECT * FROM sessions WHERE id = $1", uuid.UUID(room.id))
    assert row is not None and (row["capacity"], row["current_occupancy"]) == (50, 0)
    key = await sm.other_tenant()
    rc, out, err = await sm.cli("studyrooms", "seed", "--tenant", key[2])
    assert rc == 0, err + out
    c = sm.client(sm.token("seed-check", "student", key=key))
    rooms = (await c.sessions.list_study_rooms(page_size=100)).rooms
    assert len(rooms) == 10
    for r in rooms:
        assert r.name and (r.capacity, r.current_occupancy, r.available_spots) == (50, 0, 50)
