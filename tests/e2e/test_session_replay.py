"""Replay: folding a session's event log rebuilds the status and roster the tables hold.

For every scenario of the session e2e modules (STR-006 lifecycle, the error refusals, the
capacity races, presence with disconnect/grace/reconnect/kick, study rooms, the attendance
script, random study-room sequences) the event log, read through ListSessionEvents and
straight from `session_events`, is folded with `classmesh.session.replay.fold_session_events`
and compared with `sessions.status`, `session_participants.status` per user and
`sessions.current_occupancy`. For STR-006 every prefix of the log is compared with the tables
as they were right after the step that wrote it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from classmesh.core.events import read_events
from classmesh.session.replay import fold_session_events, seats
from classmesh_sdk import NO_RETRY, ClassMeshClient, ClassMeshError
from tests.e2e.test_session_attendance import run_attendance_script
from tests.e2e.test_session_capacity import run_race
from tests.e2e.test_session_lifecycle import (
    STUDY_ROOM,
    Code,
    SessionMesh,
    Watcher,
    about,
    all_events,
    create_session,
    db_participants,
    db_session,
    expect_error,
    live_class,
    run_str006,
    session_mesh,
    uid,
)
from tests.e2e.test_session_presence import PRESENCE_ENV


@pytest.fixture(scope="module")
async def sm(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SessionMesh]:
    async with session_mesh(
        admin_database_url,
        redis_url,
        tmp_path_factory,
        "replay",
        {"CLASSMESH_RATE_LIMIT_PER_MINUTE": "0"},
    ) as m:
        yield m


@pytest.fixture(scope="module")
async def fast(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SessionMesh]:
    """A second mesh with ~1 s presence timings for the presence scenario."""
    async with session_mesh(
        admin_database_url, redis_url, tmp_path_factory, "replay_fast", PRESENCE_ENV
    ) as m:
        yield m


@pytest.fixture(scope="module")
async def admin(sm: SessionMesh) -> AsyncIterator[ClassMeshClient]:
    async with ClassMeshClient(sm.target, token=sm.token("replay-admin", "admin")) as c:
        yield c


@dataclass(frozen=True)
class Tables:
    last_seq: int
    status: str
    roster: dict[str, str]
    occupancy: int


async def tables(sm: SessionMesh, sid: str) -> Tables:
    """The session's row and roster in one snapshot."""
    async with sm.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        row = await conn.fetchrow(
            "SELECT last_seq, status::text, current_occupancy FROM sessions WHERE id = $1",
            uuid.UUID(sid),
        )
        assert row is not None
        parts = await conn.fetch(
            "SELECT user_id, status::text FROM session_participants WHERE session_id = $1",
            uuid.UUID(sid),
        )
    return Tables(
        row["last_seq"], row["status"], {r["user_id"]: r["status"] for r in parts}, row[2]
    )


async def assert_fold_matches(sm: SessionMesh, sid: str) -> Tables:
    """Fold the log (API and table) and compare with the tables; returns the tables."""
    async with ClassMeshClient(sm.target, token=sm.token("folder", "admin")) as c:
        events = await all_events(c, sid)
    now_tables = await tables(sm, sid)
    # Presence sweeps may append while we read: compare against a quiet snapshot.
    if events and events[-1].seq != now_tables.last_seq:
        raise AssertionError(f"log moved while reading: {events[-1].seq} {now_tables.last_seq}")
    status, roster = fold_session_events(events)
    assert status == now_tables.status
    assert roster == now_tables.roster
    assert seats(roster) == now_tables.occupancy
    records = await read_events(sm.pool, tenant_id=sm.tenant_id, session_id=sid, limit=500)
    assert [r.seq for r in records] == [e.seq for e in events][: len(records)]
    if len(records) == len(events):
        assert fold_session_events(records) == (status, roster)
    return now_tables


# ============================================================================ scenarios


async def test_replay_str006_every_prefix(sm: SessionMesh) -> None:
    snapshots: list[Tables] = []

    async def snap(sid: str) -> None:
        snapshots.append(await tables(sm, sid))

    sid = await run_str006(sm, checks=False, on_step=snap)
    assert len(snapshots) >= 8
    final = await assert_fold_matches(sm, sid)
    assert final.status == "ended"
    events = await all_events(sm.admin(), sid)
    for t in snapshots:
        status, roster = fold_session_events([e for e in events if e.seq <= t.last_seq])
        assert (status, roster) == (t.status, t.roster), t.last_seq
        assert seats(roster) == t.occupancy, t.last_seq


async def test_replay_after_refusals(sm: SessionMesh, admin: ClassMeshClient) -> None:
    """Refused requests append nothing, so the fold still equals the tables."""
    s, teacher, inst = await live_class(sm, capacity=2)
    await inst.sessions.join_session(session_id=s.id)
    kid, waiting = uid("kid"), uid("wait")
    await sm.as_user(kid).sessions.join_session(session_id=s.id)
    await expect_error(
        sm.as_user(waiting).sessions.join_session(session_id=s.id, retry=NO_RETRY),
        Code.RESOURCE_EXHAUSTED,
        "SESSION_FULL",
    )
    await inst.sessions.remove_participant(session_id=s.id, user_id=kid)
    await expect_error(
        sm.as_user(kid).sessions.join_session(session_id=s.id, retry=NO_RETRY),
        Code.PERMISSION_DENIED,
        "PARTICIPANT_REMOVED",
    )
    await expect_error(
        admin.sessions.remove_participant(session_id=s.id, user_id=teacher, retry=NO_RETRY),
        Code.FAILED_PRECONDITION,
        "LAST_INSTRUCTOR",
    )
    await expect_error(
        inst.sessions.start_session(session_id=s.id, retry=NO_RETRY),
        Code.ABORTED,
        "SESSION_ALREADY_LIVE",
    )
    await sm.as_user(waiting).sessions.join_session(session_id=s.id)
    t = await assert_fold_matches(sm, s.id)
    assert t.roster == {teacher: "admitted", kid: "removed", waiting: "lobby"}
    # A cancelled and a deleted session fold too.
    c = await create_session(admin, instructor_id=teacher)
    await inst.sessions.cancel_session(session_id=c.id)
    assert (await assert_fold_matches(sm, c.id)).status == "cancelled"
    d = await create_session(admin, instructor_id=teacher)
    await admin.sessions.delete_session(session_id=d.id)
    assert (await assert_fold_matches(sm, d.id)).status == "scheduled"


async def test_replay_capacity_races(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm, capacity=30)
    await run_race(sm, s.id, [("join", uid("r")) for _ in range(200)], 30)
    await assert_fold_matches(sm, s.id)
    await inst.sessions.admit_participants(session_id=s.id, all=True)
    assert (await assert_fold_matches(sm, s.id)).occupancy == 30

    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=30)
    ok, _, _ = await run_race(sm, room.id, [("join", uid("r")) for _ in range(200)], 30)
    await assert_fold_matches(sm, room.id)
    calls = [("leave", u) for u in ok] + [("join", uid("n")) for _ in range(30)]
    await run_race(sm, room.id, calls, 30)
    await assert_fold_matches(sm, room.id)


async def test_replay_study_rooms(sm: SessionMesh) -> None:
    rc, out, err = await sm.cli("studyrooms", "seed", "--tenant", sm.tenant_id)
    assert rc == 0, err + out
    rooms = (await sm.admin().sessions.list_study_rooms(page_size=100)).rooms
    seeded = [r for r in rooms if r.name.startswith("Study Room")]
    assert len(seeded) >= 2
    a, b = seeded[0].session_id, seeded[1].session_id
    admin = sm.admin()
    users = [uid("s") for _ in range(5)]
    cs = {u: sm.as_user(u) for u in users}
    for u in users[:3]:
        await cs[u].sessions.join_session(session_id=a)
    for u in users[3:]:
        await cs[u].sessions.join_session(session_id=b)
    await cs[users[0]].sessions.leave_session(session_id=a)
    await admin.sessions.mute_participant(session_id=a, user_id=users[1], audio=True)
    await admin.sessions.remove_participant(session_id=a, user_id=users[2], reason="kick")
    await cs[users[0]].sessions.join_session(session_id=a)  # a second visit
    await cs[users[3]].sessions.leave_session(session_id=b)
    ta = await assert_fold_matches(sm, a)
    assert ta.roster == {users[0]: "admitted", users[1]: "admitted", users[2]: "removed"}
    tb = await assert_fold_matches(sm, b)
    assert tb.roster == {users[3]: "left", users[4]: "admitted"}


async def test_replay_attendance_script(sm: SessionMesh) -> None:
    script = await run_attendance_script(sm)
    t = await assert_fold_matches(sm, script.session_id)
    assert t.status == "ended"
    assert t.roster[script.c] == "removed"
    assert t.roster[script.a] == t.roster[script.b] == "left"


async def test_replay_presence(fast: SessionMesh) -> None:
    room = await create_session(fast.admin(), kind=STUDY_ROOM, capacity=10)
    watch = Watcher(fast.admin("w"), room.id)
    quiet, flaky, kicked, steady = (uid(n) for n in ("quiet", "flaky", "kicked", "steady"))
    cs = {u: fast.as_user(u) for u in (quiet, flaky, kicked, steady)}
    for u in cs:
        await cs[u].sessions.join_session(session_id=room.id)
    stop = asyncio.Event()

    async def beat(users: list[str]) -> None:
        while not stop.is_set():
            for u in users:
                try:
                    await cs[u].sessions.heartbeat(session_id=room.id)
                except ClassMeshError:
                    pass
            await asyncio.sleep(0.15)

    beater = asyncio.create_task(beat([steady, kicked]))
    # quiet and flaky go silent; both are disconnected.
    await watch.wait_for(about(flaky, "participant_disconnected"), 8, "flaky disconnected")
    await cs[flaky].sessions.join_session(session_id=room.id)  # reconnect in grace
    await watch.wait_for(about(flaky, "participant_reconnected"), 5, "flaky reconnected")
    await fast.admin().sessions.remove_participant(session_id=room.id, user_id=kicked)
    await watch.wait_for(about(quiet, "participant_left"), 8, "quiet left")
    stop.set()
    await beater
    await watch.stop()
    # flaky and steady are silent now: the sweeper lets them go; then fold.
    late = Watcher(fast.admin("w2"), room.id)
    await late.wait_for(about(flaky, "participant_left"), 8, "flaky left")
    await late.wait_for(about(steady, "participant_left"), 8, "steady left")
    await late.stop()
    t = await assert_fold_matches(fast, room.id)
    assert t.roster == {quiet: "left", flaky: "left", kicked: "removed", steady: "left"}
    assert t.occupancy == 0
    rows = await db_participants(fast.pool, room.id)
    assert rows[flaky]["join_count"] == 2


op_strategy = st.lists(
    st.tuples(st.sampled_from(["join", "leave", "kick", "mute"]), st.integers(0, 3)),
    min_size=1,
    max_size=10,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(1, 3), ops=op_strategy)
async def test_replay_random_study_room_sequences(
    sm: SessionMesh, admin: ClassMeshClient, capacity: int, ops: list[tuple[str, int]]
) -> None:
    room = await create_session(admin, kind=STUDY_ROOM, capacity=capacity)
    users = [f"h-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    tokens = {u: sm.token(u, "student") for u in users}
    for op, i in ops:
        u = users[i]
        md = [("authorization", f"Bearer {tokens[u]}")]
        try:
            if op == "join":
                await admin.sessions.join_session(session_id=room.id, metadata=md, retry=NO_RETRY)
            elif op == "leave":
                await admin.sessions.leave_session(session_id=room.id, metadata=md, retry=NO_RETRY)
            elif op == "kick":
                await admin.sessions.remove_participant(
                    session_id=room.id, user_id=u, retry=NO_RETRY
                )
            else:
                await admin.sessions.mute_participant(
                    session_id=room.id, user_id=u, audio=True, retry=NO_RETRY
                )
        except ClassMeshError as exc:
            # Refusals are part of the game; what matters is what the log says afterwards.
            assert exc.code not in (Code.INTERNAL, Code.UNKNOWN), exc
    t = await assert_fold_matches(sm, room.id)
    assert 0 <= t.occupancy <= capacity
    assert (await db_session(sm.pool, room.id))["current_occupancy"] == t.occupancy
