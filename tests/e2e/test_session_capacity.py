"""Exact capacity under concurrency (seed 003 property 7).

200 concurrent JoinSession calls on capacity 30, for a class (students wait in the lobby,
which holds a seat) and a study room (admitted directly): exactly 30 seated, 170
RESOURCE_EXHAUSTED (SESSION_FULL / ROOM_FULL, with RetryInfo). While the race runs the
occupancy is sampled from the database (counter and seated rows in one statement) and
through GetSession; it never leaves [0, capacity] and the counter always equals the rows.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from classmesh_sdk import NO_RETRY, ClassMeshClient, ClassMeshError
from tests.e2e.test_session_lifecycle import (
    SEATED,
    STUDY_ROOM,
    Code,
    S,
    SessionMesh,
    all_events,
    create_session,
    db_event_types,
    db_participants,
    db_session,
    event_type,
    live_class,
    session_mesh,
    uid,
)

N = 200
CAPACITY = 30
CHANNELS = 8


@pytest.fixture(scope="module")
async def sm(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SessionMesh]:
    async with session_mesh(
        admin_database_url,
        redis_url,
        tmp_path_factory,
        "capacity",
        {"CLASSMESH_RATE_LIMIT_PER_MINUTE": "0"},
    ) as m:
        yield m


@dataclass
class Samples:
    db: list[tuple[int, int]] = field(default_factory=list)
    api: list[tuple[int, int]] = field(default_factory=list)

    def check(self, capacity: int) -> None:
        assert self.db, "no database samples taken"
        assert self.api, "no API samples taken"
        for counter, rows in self.db:
            assert 0 <= counter <= capacity, self.db
            assert counter == rows, f"occupancy {counter} != seated rows {rows}"
        for occupancy, spots in self.api:
            assert 0 <= occupancy <= capacity, self.api
            assert spots == capacity - occupancy, self.api


async def _sample(sm: SessionMesh, sid: str, stop: asyncio.Event, out: Samples) -> None:
    admin = sm.admin("sampler")
    sql = (
        "SELECT s.current_occupancy, (SELECT count(*) FROM session_participants p "
        "WHERE p.session_id = s.id AND p.status::text = ANY($2::text[])) AS seated "
        "FROM sessions s WHERE s.id = $1"
    )

    async def db_loop() -> None:
        while not stop.is_set():
            row = await sm.pool.fetchrow(sql, uuid.UUID(sid), list(SEATED))
            assert row is not None
            out.db.append((row[0], row[1]))
            await asyncio.sleep(0.005)

    async def api_loop() -> None:
        while not stop.is_set():
            got = (await admin.sessions.get_session(session_id=sid)).session
            out.api.append((got.current_occupancy, got.available_spots))
            await asyncio.sleep(0.01)

    await asyncio.gather(db_loop(), api_loop())


def _pool_of_clients(sm: SessionMesh) -> list[ClassMeshClient]:
    return [sm.client(None) for _ in range(CHANNELS)]


async def run_race(
    sm: SessionMesh, sid: str, calls: list[tuple[str, str]], capacity: int
) -> tuple[dict[str, Any], dict[str, ClassMeshError], Samples]:
    """Run (op, user) calls at once ("join"/"leave"); sample occupancy meanwhile."""
    clients = _pool_of_clients(sm)
    tokens = {u: sm.token(u, "student") for _, u in calls}
    go = asyncio.Event()

    async def one(i: int, op: str, user: str) -> tuple[str, Any]:
        c = clients[i % len(clients)]
        md = [("authorization", f"Bearer {tokens[user]}")]
        await go.wait()
        try:
            if op == "join":
                return user, await c.sessions.join_session(
                    session_id=sid, retry=NO_RETRY, timeout=60, metadata=md
                )
            return user, await c.sessions.leave_session(
                session_id=sid, retry=NO_RETRY, timeout=60, metadata=md
            )
        except ClassMeshError as exc:
            return user, exc

    stop = asyncio.Event()
    samples = Samples()
    sampler = asyncio.create_task(_sample(sm, sid, stop, samples))
    tasks = [asyncio.create_task(one(i, op, u)) for i, (op, u) in enumerate(calls)]
    await asyncio.sleep(0.05)
    go.set()
    results = await asyncio.gather(*tasks)
    await asyncio.sleep(0.05)
    stop.set()
    await sampler
    ok = {u: r for u, r in results if not isinstance(r, ClassMeshError)}
    failed = {u: r for u, r in results if isinstance(r, ClassMeshError)}
    samples.check(capacity)
    return ok, failed, samples


def _assert_full_errors(failed: dict[str, ClassMeshError], reason: str) -> None:
    wrong = {
        u: f"{e.code.name} {e.reason}"
        for u, e in failed.items()
        if (e.code, e.reason) != (Code.RESOURCE_EXHAUSTED, reason)
    }
    assert wrong == {}
    assert all(e.retry_after is not None and e.retry_after > 0 for e in failed.values())


async def _assert_settled(sm: SessionMesh, sid: str, seated: set[str], capacity: int) -> None:
    rows = await db_participants(sm.pool, sid)
    assert {u for u, r in rows.items() if r["status"] in SEATED} == seated
    assert (await db_session(sm.pool, sid))["current_occupancy"] == len(seated)
    got = (await sm.admin().sessions.get_session(session_id=sid)).session
    assert (got.current_occupancy, got.available_spots) == (len(seated), capacity - len(seated))


async def test_class_capacity_race(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm, capacity=CAPACITY)
    users = [uid("racer") for _ in range(N)]
    ok, failed, samples = await run_race(sm, s.id, [("join", u) for u in users], CAPACITY)
    assert (len(ok), len(failed)) == (CAPACITY, N - CAPACITY)
    _assert_full_errors(failed, "SESSION_FULL")
    assert all(r.status == S.PARTICIPANT_STATUS_LOBBY for r in ok.values())
    await _assert_settled(sm, s.id, set(ok), CAPACITY)
    assert max(c for c, _ in samples.db) == CAPACITY
    types = await db_event_types(sm.pool, s.id)
    assert types.count("participant_joined") == CAPACITY
    # Rejected joiners left nothing behind.
    assert set(await db_participants(sm.pool, s.id)) == set(ok)

    # Two moderators admitting everyone at once admit each lobby participant exactly once;
    # lobby participants already hold their seats, so occupancy stays put.
    assistant = sm.as_user(uid("assistant"), "assistant")
    a, b = await asyncio.gather(
        inst.sessions.admit_participants(session_id=s.id, all=True),
        assistant.sessions.admit_participants(session_id=s.id, all=True),
    )
    admitted = [p.user_id for p in a.admitted] + [p.user_id for p in b.admitted]
    assert sorted(admitted) == sorted(ok)
    await _assert_settled(sm, s.id, set(ok), CAPACITY)
    assert (await db_event_types(sm.pool, s.id)).count("participant_admitted") == CAPACITY
    rows = await db_participants(sm.pool, s.id)
    assert {r["status"] for r in rows.values()} == {"admitted"}


async def test_study_room_capacity_race(sm: SessionMesh) -> None:
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=CAPACITY)
    users = [uid("racer") for _ in range(N)]
    ok, failed, _ = await run_race(sm, room.id, [("join", u) for u in users], CAPACITY)
    assert (len(ok), len(failed)) == (CAPACITY, N - CAPACITY)
    _assert_full_errors(failed, "ROOM_FULL")
    assert all(r.status == S.PARTICIPANT_STATUS_ADMITTED for r in ok.values())
    await _assert_settled(sm, room.id, set(ok), CAPACITY)
    assert set(await db_participants(sm.pool, room.id)) == set(ok)
    listed = await sm.admin().sessions.list_study_rooms(page_size=100)
    mine = [r for r in listed.rooms if r.session_id == room.id]
    assert len(mine) == 1
    assert (mine[0].current_occupancy, mine[0].available_spots) == (CAPACITY, 0)

    # Everyone leaves while newcomers try to get in: seats freed are taken at most once.
    seated = list(ok)
    newcomers = [uid("late") for _ in range(CAPACITY)]
    calls = [("leave", u) for u in seated] + [("join", u) for u in newcomers]
    ok2, failed2, _ = await run_race(sm, room.id, calls, CAPACITY)
    left = [u for u in seated if u in ok2]
    assert left == seated, {u: failed2[u] for u in seated if u in failed2}
    got_in = {u for u in newcomers if u in ok2}
    _assert_full_errors({u: e for u, e in failed2.items() if u in newcomers}, "ROOM_FULL")
    await _assert_settled(sm, room.id, got_in, CAPACITY)

    # The rest leave at once: occupancy reaches 0 and never goes below.
    ok3, failed3, samples = await run_race(sm, room.id, [("leave", u) for u in got_in], CAPACITY)
    assert failed3 == {} and set(ok3) == got_in
    await _assert_settled(sm, room.id, set(), CAPACITY)
    assert min(c for c, _ in samples.db) >= 0
    visits = await sm.pool.fetchval(
        "SELECT count(*) FROM session_logs WHERE session_id = $1", uuid.UUID(room.id)
    )
    assert visits == CAPACITY + len(got_in)


async def test_same_user_racing_itself_takes_one_seat(sm: SessionMesh) -> None:
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=5)
    user = uid("twin")
    c = sm.as_user(user)
    results = await asyncio.gather(
        *(c.sessions.join_session(session_id=room.id, retry=NO_RETRY) for _ in range(10)),
        return_exceptions=True,
    )
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert len({r.participant.id for r in results}) == 1  # type: ignore[union-attr]
    await _assert_settled(sm, room.id, {user}, 5)
    # Ten concurrent leaves free exactly one seat.
    await asyncio.gather(
        *(c.sessions.leave_session(session_id=room.id, retry=NO_RETRY) for _ in range(10)),
        return_exceptions=True,
    )
    await _assert_settled(sm, room.id, set(), 5)
    row = (await db_participants(sm.pool, room.id))[user]
    assert row["status"] == "left"


async def test_end_session_racing_joins_leaves_nobody_seated(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm, capacity=100)
    users = [uid("late") for _ in range(60)]
    tokens = {u: sm.token(u, "student") for u in users}
    clients = _pool_of_clients(sm)

    async def join(i: int, u: str) -> object:
        md = [("authorization", f"Bearer {tokens[u]}")]
        try:
            return await clients[i % len(clients)].sessions.join_session(
                session_id=s.id, retry=NO_RETRY, metadata=md
            )
        except ClassMeshError as exc:
            return exc

    joins = [asyncio.create_task(join(i, u)) for i, u in enumerate(users)]
    await asyncio.sleep(0.01)
    ended = await inst.sessions.end_session(session_id=s.id)
    results = await asyncio.gather(*joins)
    refused = [r for r in results if isinstance(r, ClassMeshError)]
    assert {(e.code, e.reason) for e in refused} <= {(Code.FAILED_PRECONDITION, "SESSION_ENDED")}
    assert ended.session.status == S.SESSION_STATUS_ENDED
    row = await db_session(sm.pool, s.id)
    assert (row["status"], row["current_occupancy"]) == ("ended", 0)
    rows = await db_participants(sm.pool, s.id)
    assert {r["status"] for r in rows.values()} <= {"left"}
    assert len(rows) == len(results) - len(refused)
    types = await db_event_types(sm.pool, s.id)
    end_at = types.index("session_ended")
    assert "participant_joined" not in types[end_at:]


async def test_removal_racing_leave_settles_each_participant_once(sm: SessionMesh) -> None:
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=40)
    users = [uid("pair") for _ in range(20)]
    clients = {u: sm.as_user(u) for u in users}
    for u in users:
        await clients[u].sessions.join_session(session_id=room.id)
    admin = sm.admin()

    async def attempt(call: Any) -> ClassMeshError | None:
        try:
            await call
        except ClassMeshError as exc:
            return exc
        return None

    calls = []
    for u in users:
        calls.append(attempt(clients[u].sessions.leave_session(session_id=room.id, retry=NO_RETRY)))
        calls.append(
            attempt(
                admin.sessions.remove_participant(session_id=room.id, user_id=u, retry=NO_RETRY)
            )
        )
    results = await asyncio.gather(*calls)
    await _assert_settled(sm, room.id, set(), 40)  # every seat freed exactly once
    rows = await db_participants(sm.pool, room.id)
    events = [
        (e.seq, event_type(e), getattr(e, event_type(e)).participant.user_id)
        for e in await all_events(admin, room.id)
        if event_type(e) in ("participant_left", "participant_removed")
    ]
    for n, u in enumerate(users):
        leave_err, remove_err = results[2 * n], results[2 * n + 1]
        mine = [kind for _, kind, who in events if who == u]
        story = f"{u}: leave -> {leave_err!r}, remove -> {remove_err!r}; events {mine}"
        # A removal may also land after the leave (it then bans a user who already left),
        # but the user ends up settled exactly once and the final status says who won.
        assert leave_err is None or remove_err is None, story
        assert rows[u]["status"] == ("removed" if remove_err is None else "left"), story
        # A leave that queued behind the removal tells the user they were removed.
        if leave_err is not None:
            assert (leave_err.code, leave_err.reason) == (
                Code.PERMISSION_DENIED,
                "PARTICIPANT_REMOVED",
            ), story
        if remove_err is not None:
            assert remove_err.code == Code.FAILED_PRECONDITION, story
    logs = await sm.pool.fetch(
        "SELECT user_id, count(*) AS n FROM session_logs WHERE session_id = $1 GROUP BY user_id",
        uuid.UUID(room.id),
    )
    assert {r["user_id"]: r["n"] for r in logs} == {u: 1 for u in users}


async def test_capacity_change_racing_joins_never_overbooks(sm: SessionMesh) -> None:
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=30)
    admin = sm.admin()
    users = [uid("cap") for _ in range(25)]
    clients = _pool_of_clients(sm)
    tokens = {u: sm.token(u, "student") for u in users}

    async def join(i: int, u: str) -> ClassMeshError | None:
        md = [("authorization", f"Bearer {tokens[u]}")]
        try:
            await clients[i % len(clients)].sessions.join_session(
                session_id=room.id, retry=NO_RETRY, metadata=md
            )
        except ClassMeshError as exc:
            return exc
        return None

    async def shrink() -> ClassMeshError | None:
        await asyncio.sleep(0.02)
        try:
            await admin.sessions.update_session(
                session=S.Session(id=room.id, capacity=20),
                update_mask=field_mask_pb2.FieldMask(paths=["capacity"]),
                retry=NO_RETRY,
            )
        except ClassMeshError as exc:
            return exc
        return None

    *joins, shrunk = await asyncio.gather(*(join(i, u) for i, u in enumerate(users)), shrink())
    row = await db_session(sm.pool, room.id)
    if shrunk is None:
        assert row["capacity"] == 20
    else:
        assert (shrunk.code, shrunk.reason) == (
            Code.FAILED_PRECONDITION,
            "CAPACITY_BELOW_OCCUPANCY",
        )
        assert row["capacity"] == 30
    seated = {u for u, e in zip(users, joins, strict=True) if e is None}
    refused = [e for e in joins if e is not None]
    assert {(e.code, e.reason) for e in refused} <= {(Code.RESOURCE_EXHAUSTED, "ROOM_FULL")}
    assert len(seated) <= row["capacity"]
    await _assert_settled(sm, room.id, seated, row["capacity"])


async def test_removal_racing_a_rejoin_keeps_the_user_out(sm: SessionMesh) -> None:
    """A join (a second tab) that queues behind the removal of its user must not re-admit it."""
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=40)
    users = [uid("banned") for _ in range(20)]
    clients = {u: sm.as_user(u) for u in users}
    for u in users:
        await clients[u].sessions.join_session(session_id=room.id)
    admin = sm.admin()

    async def attempt(call: Any) -> ClassMeshError | None:
        try:
            await call
        except ClassMeshError as exc:
            return exc
        return None

    calls = []
    for u in users:
        calls.append(
            attempt(
                admin.sessions.remove_participant(session_id=room.id, user_id=u, retry=NO_RETRY)
            )
        )
        calls.append(attempt(clients[u].sessions.join_session(session_id=room.id, retry=NO_RETRY)))
    results = await asyncio.gather(*calls)
    rows = await db_participants(sm.pool, room.id)
    readmitted = {
        u: (rows[u]["status"], results[2 * n + 1])
        for n, u in enumerate(users)
        if results[2 * n] is None and rows[u]["status"] != "removed"
    }
    assert readmitted == {}, "removed users back in the room after a racing join"
    for n, u in enumerate(users):
        join_err = results[2 * n + 1]
        if join_err is not None:
            assert (join_err.code, join_err.reason) == (
                Code.PERMISSION_DENIED,
                "PARTICIPANT_REMOVED",
            ), u
    await _assert_settled(sm, room.id, set(), 40)
