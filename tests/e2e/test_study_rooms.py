"""Study rooms (seed 003) end to end: seed command, room list, join/leave/kick/mute, logs.

`classmesh studyrooms seed --tenant <id>` creates 10 rooms x 50 seats; ListStudyRooms shows
occupancy and available spots; every leave (also kicks and disconnects) writes a session
log row; ListStudyRoomLogs filters by user, room and date range.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from classmesh.session.v1 import session_pb2
from classmesh_sdk import NO_RETRY, ClassMeshClient
from tests.e2e.test_session_lifecycle import (
    Code,
    S,
    SessionMesh,
    all_events,
    db_participants,
    db_session,
    event_type,
    expect_error,
    now,
    session_mesh,
    time_range,
    uid,
)

ROOMS = 10
SEATS = 50


@pytest.fixture(scope="module")
async def sm(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SessionMesh]:
    async with session_mesh(
        admin_database_url,
        redis_url,
        tmp_path_factory,
        "studyrooms",
        {"CLASSMESH_RATE_LIMIT_PER_MINUTE": "0"},
    ) as m:
        yield m


@pytest.fixture(scope="module")
async def rooms(sm: SessionMesh) -> list[session_pb2.StudyRoom]:
    """The dev tenant's seeded rooms (seeded once for the module)."""
    rc, out, err = await sm.cli("studyrooms", "seed", "--tenant", sm.tenant_id)
    assert rc == 0, err + out
    listed = await _list_all(sm.as_user(uid("lister")))
    assert len(listed) == ROOMS
    return listed


async def _list_all(c: ClassMeshClient, **kw: object) -> list[session_pb2.StudyRoom]:
    out: list[session_pb2.StudyRoom] = []
    token = ""
    while True:
        resp = await c.sessions.list_study_rooms(page_size=100, page_token=token, **kw)
        out.extend(resp.rooms)
        token = resp.next_page_token
        if not token:
            return out


async def _room(c: ClassMeshClient, session_id: str) -> session_pb2.StudyRoom:
    found = [r for r in await _list_all(c) if r.session_id == session_id]
    assert len(found) == 1, session_id
    return found[0]


async def _logs(c: ClassMeshClient, **kw: object) -> tuple[list[session_pb2.StudyRoomLog], float]:
    out: list[session_pb2.StudyRoomLog] = []
    token = ""
    total = -1.0
    while True:
        resp = await c.sessions.list_study_room_logs(page_size=500, page_token=token, **kw)
        out.extend(resp.logs)
        if total < 0:
            total = resp.total_duration.ToTimedelta().total_seconds()
            assert resp.total_size >= len(resp.logs)
        token = resp.next_page_token
        if not token:
            return out, total


# ============================================================================ seed and list


async def test_seed_creates_ten_rooms_of_fifty_seats(
    sm: SessionMesh, rooms: list[session_pb2.StudyRoom]
) -> None:
    names = [r.name for r in rooms]
    assert len(set(names)) == ROOMS and all(names)
    assert set(names) == {f"Study Room {i}" for i in range(1, ROOMS + 1)}
    for r in rooms:
        assert (r.capacity, r.current_occupancy, r.available_spots) == (SEATS, 0, SEATS)
        assert not r.joined
        assert r.status in (S.SESSION_STATUS_SCHEDULED, S.SESSION_STATUS_LIVE)
    db = await sm.pool.fetch(
        "SELECT * FROM sessions WHERE tenant_id = $1 AND kind = 'study_room'",
        uuid.UUID(sm.tenant_id),
    )
    assert {str(r["id"]) for r in db} == {r.session_id for r in rooms}
    assert {(r["capacity"], r["current_occupancy"]) for r in db} == {(SEATS, 0)}
    # Seeding again changes nothing.
    rc, out, err = await sm.cli("studyrooms", "seed", "--tenant", sm.tenant_id)
    assert rc == 0, err + out
    again = await sm.pool.fetchval(
        "SELECT count(*) FROM sessions WHERE tenant_id = $1 AND kind = 'study_room'",
        uuid.UUID(sm.tenant_id),
    )
    assert again == ROOMS
    # Another tenant gets its own ten; neither sees the other's.
    key = await sm.other_tenant()
    rc, out, err = await sm.cli("studyrooms", "seed", "--tenant", key[2])
    assert rc == 0, err + out
    theirs = await _list_all(sm.client(sm.token("b-user", "student", key=key)))
    assert len(theirs) == ROOMS
    assert not {r.session_id for r in theirs} & {r.session_id for r in rooms}
    assert len(await _list_all(sm.as_user(uid("lister")))) == ROOMS


async def test_seed_rejects_an_unknown_tenant(sm: SessionMesh) -> None:
    sql = "SELECT count(*) FROM sessions WHERE kind = 'study_room'"
    before = await sm.pool.fetchval(sql)
    rc, out, err = await sm.cli("studyrooms", "seed", "--tenant", str(uuid.uuid4()))
    assert rc != 0
    assert "Traceback" not in err
    assert await sm.pool.fetchval(sql) == before


# ============================================================================ join / leave


async def test_join_and_leave_update_occupancy_and_write_a_visit_log(
    sm: SessionMesh, rooms: list[session_pb2.StudyRoom]
) -> None:
    room = rooms[0]
    user, other = uid("learner"), uid("learner")
    c = sm.as_user(user, name="Lena Learner")
    oc = sm.as_user(other)
    t0 = now()
    joined = await c.sessions.join_session(session_id=room.session_id)
    t1 = now()
    assert joined.status == S.PARTICIPANT_STATUS_ADMITTED  # no lobby in study rooms
    p = joined.participant
    assert (p.user_id, p.session_id) == (user, room.session_id)
    joined_at = p.joined_at.ToDatetime().replace(tzinfo=t0.tzinfo)
    assert t0 - timedelta(seconds=1) <= joined_at <= t1 + timedelta(seconds=1)
    mine = await _room(c, room.session_id)
    assert (mine.current_occupancy, mine.available_spots, mine.joined) == (1, SEATS - 1, True)
    theirs = await _room(oc, room.session_id)
    assert (theirs.current_occupancy, theirs.joined) == (1, False)
    row = (await db_participants(sm.pool, room.session_id))[user]
    assert row["status"] == "admitted"
    assert (await db_session(sm.pool, room.session_id))["current_occupancy"] == 1

    await asyncio.sleep(1.5)
    t2 = now()
    left = await c.sessions.leave_session(session_id=room.session_id)
    t3 = now()
    assert left.participant.status == S.PARTICIPANT_STATUS_LEFT
    visit = left.visit_duration.ToTimedelta().total_seconds()
    assert (t2 - t1).total_seconds() - 1 <= visit <= (t3 - t0).total_seconds() + 1
    after = await _room(c, room.session_id)
    assert (after.current_occupancy, after.available_spots, after.joined) == (0, SEATS, False)
    assert (await db_participants(sm.pool, room.session_id))[user]["status"] == "left"
    assert (await db_session(sm.pool, room.session_id))["current_occupancy"] == 0

    logs, total = await _logs(c, user_id=user)
    assert len(logs) == 1
    log = logs[0]
    assert (log.session_id, log.user_id, log.room_name) == (room.session_id, user, room.name)
    assert log.kind == S.STUDY_ROOM_LOG_KIND_VISIT
    assert log.detail == "left"
    assert log.display_name == "Lena Learner"
    span = (log.left_at.ToDatetime() - log.joined_at.ToDatetime()).total_seconds()
    assert abs(log.duration.ToTimedelta().total_seconds() - span) <= 1
    assert abs(log.duration.ToTimedelta().total_seconds() - visit) <= 1
    assert abs(total - log.duration.ToTimedelta().total_seconds()) < 0.001
    db_logs = await sm.pool.fetch(
        "SELECT * FROM session_logs WHERE session_id = $1 AND user_id = $2",
        uuid.UUID(room.session_id),
        user,
    )
    assert len(db_logs) == 1
    assert (db_logs[0]["kind"], db_logs[0]["reason"]) == ("visit", "left")
    assert db_logs[0]["duration_seconds"] >= 1

    # Rejoining starts a new visit of the same participant.
    back = await c.sessions.join_session(session_id=room.session_id)
    assert back.participant.id == p.id
    assert back.status == S.PARTICIPANT_STATUS_ADMITTED
    await c.sessions.leave_session(session_id=room.session_id)
    assert len((await _logs(c, user_id=user))[0]) == 2


async def test_leave_without_joining_is_rejected(
    sm: SessionMesh, rooms: list[session_pb2.StudyRoom]
) -> None:
    room = rooms[1]
    stranger = sm.as_user(uid("stranger"))
    before = await db_session(sm.pool, room.session_id)
    # Seed 003 property 8: 404.
    await expect_error(
        stranger.sessions.leave_session(session_id=room.session_id, retry=NO_RETRY),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )
    assert (await db_session(sm.pool, room.session_id))["current_occupancy"] == before[
        "current_occupancy"
    ]


async def test_rooms_are_isolated(sm: SessionMesh, rooms: list[session_pb2.StudyRoom]) -> None:
    a, b = rooms[2], rooms[3]
    admin = sm.admin()
    b_before = await all_events(admin, b.session_id)
    user = uid("iso")
    await sm.as_user(user).sessions.join_session(session_id=a.session_id)
    assert await all_events(admin, b.session_id) == b_before
    assert (await _room(admin, b.session_id)).current_occupancy == 0
    a_events = await all_events(admin, a.session_id)
    assert any(
        event_type(e) == "participant_joined" and e.participant_joined.participant.user_id == user
        for e in a_events
    )
    assert all(e.session_id == a.session_id for e in a_events)
    await sm.as_user(user).sessions.leave_session(session_id=a.session_id)


# ============================================================================ moderation


async def test_admins_mute_and_kick_students_cannot(
    sm: SessionMesh, rooms: list[session_pb2.StudyRoom]
) -> None:
    room = rooms[4]
    sid = room.session_id
    noisy, rude = uid("noisy"), uid("rude")
    nc, rc_ = sm.as_user(noisy), sm.as_user(rude)
    await nc.sessions.join_session(session_id=sid)
    await rc_.sessions.join_session(session_id=sid)
    admin = sm.admin()
    # Students may not moderate others (seed 003 property 21).
    await expect_error(
        nc.sessions.mute_participant(session_id=sid, user_id=rude, audio=True, retry=NO_RETRY),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    await expect_error(
        nc.sessions.remove_participant(session_id=sid, user_id=rude, retry=NO_RETRY),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    assert (await _room(admin, sid)).current_occupancy == 2

    # Mute (property 22/23): status updated, event emitted.
    muted = await admin.sessions.mute_participant(session_id=sid, user_id=noisy, audio=True)
    assert muted.participant.audio_muted
    assert (await db_participants(sm.pool, sid))[noisy]["audio_muted"]
    events = await all_events(admin, sid)
    assert any(
        event_type(e) == "participant_muted"
        and e.participant_muted.participant.user_id == noisy
        and e.participant_muted.audio
        for e in events
    )
    assert (await _room(admin, sid)).current_occupancy == 2

    # Kick (property 24): removed, occupancy decremented, visit logged, cannot come back.
    kicked = await admin.sessions.remove_participant(session_id=sid, user_id=rude, reason="rude")
    assert kicked.participant.status == S.PARTICIPANT_STATUS_REMOVED
    assert (await _room(admin, sid)).current_occupancy == 1
    assert (await db_participants(sm.pool, sid))[rude]["status"] == "removed"
    assert (await db_session(sm.pool, sid))["current_occupancy"] == 1
    logs, _ = await _logs(admin, user_id=rude, session_id=sid)
    assert [log.detail for log in logs] == ["removed"]
    await expect_error(
        rc_.sessions.join_session(session_id=sid, retry=NO_RETRY),
        Code.PERMISSION_DENIED,
        "PARTICIPANT_REMOVED",
    )
    assert (await _room(admin, sid)).current_occupancy == 1
    await nc.sessions.leave_session(session_id=sid)


async def test_full_room_and_only_available(
    sm: SessionMesh, rooms: list[session_pb2.StudyRoom]
) -> None:
    room = rooms[5]
    sid = room.session_id
    users = [uid("filler") for _ in range(SEATS)]
    await asyncio.gather(*(sm.as_user(u).sessions.join_session(session_id=sid) for u in users))
    admin = sm.admin()
    full = await _room(admin, sid)
    assert (full.current_occupancy, full.available_spots) == (SEATS, 0)
    available = await _list_all(admin, only_available=True)
    assert sid not in {r.session_id for r in available}
    assert all(r.available_spots > 0 for r in available)
    assert len(available) == ROOMS - 1
    late = uid("late")
    err = await expect_error(
        sm.as_user(late).sessions.join_session(session_id=sid, retry=NO_RETRY),
        Code.RESOURCE_EXHAUSTED,
        "ROOM_FULL",
    )
    assert err.retry_after is not None and err.retry_after > 0
    assert late not in await db_participants(sm.pool, sid)
    # One leaves: the room is available again and the late user gets in.
    await sm.as_user(users[0]).sessions.leave_session(session_id=sid)
    assert sid in {r.session_id for r in await _list_all(admin, only_available=True)}
    ok = await sm.as_user(late).sessions.join_session(session_id=sid)
    assert ok.status == S.PARTICIPANT_STATUS_ADMITTED
    assert (await _room(admin, sid)).available_spots == 0
    await asyncio.gather(
        *(sm.as_user(u).sessions.leave_session(session_id=sid) for u in [*users[1:], late])
    )
    assert (await _room(admin, sid)).current_occupancy == 0


# ============================================================================ logs


async def test_study_room_log_queries(sm: SessionMesh, rooms: list[session_pb2.StudyRoom]) -> None:
    r1, r2 = rooms[6], rooms[7]
    u1, u2 = uid("logger"), uid("logger")
    c1, c2 = sm.as_user(u1), sm.as_user(u2)
    admin = sm.admin()

    async def visit(c: ClassMeshClient, room: session_pb2.StudyRoom) -> None:
        await c.sessions.join_session(session_id=room.session_id)
        await c.sessions.leave_session(session_id=room.session_id)

    await visit(c1, r1)
    await visit(c2, r1)
    await visit(c1, r2)
    await asyncio.sleep(1.1)
    mid = now()
    await asyncio.sleep(0.2)
    await visit(c1, r1)
    await visit(c2, r2)

    by_user, total = await _logs(admin, user_id=u1)
    assert len(by_user) == 3 and {x.user_id for x in by_user} == {u1}
    assert total == pytest.approx(sum(x.duration.ToTimedelta().total_seconds() for x in by_user))
    by_room, _ = await _logs(admin, session_id=r1.session_id)
    mine = [x for x in by_room if x.user_id in (u1, u2)]
    assert len(mine) == 3 and {x.session_id for x in by_room} == {r1.session_id}
    both, _ = await _logs(admin, user_id=u1, session_id=r2.session_id)
    assert [(x.user_id, x.session_id) for x in both] == [(u1, r2.session_id)]
    recent, _ = await _logs(admin, time_range=time_range(mid))
    assert sorted((x.user_id, x.session_id) for x in recent) == sorted(
        [(u1, r1.session_id), (u2, r2.session_id)]
    )
    older, _ = await _logs(admin, user_id=u1, time_range=time_range(None, mid))
    assert sorted(x.session_id for x in older) == sorted([r1.session_id, r2.session_id])
    visits, _ = await _logs(admin, user_id=u2, kind=S.STUDY_ROOM_LOG_KIND_VISIT)
    assert len(visits) == 2
    # Newest first.
    times = [x.create_time.ToDatetime() for x in by_user]
    assert times == sorted(times, reverse=True)
    # Paging returns every row once.
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.sessions.list_study_room_logs(user_id=u1, page_size=1, page_token=token)
        assert len(page.logs) <= 1 and page.total_size == 3
        seen.extend(x.id for x in page.logs)
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(x.id for x in by_user)
    # The database holds the same rows.
    db_rows = await sm.pool.fetch("SELECT id FROM session_logs WHERE user_id = $1", u1)
    assert sorted(str(r["id"]) for r in db_rows) == sorted(seen)

    # Another tenant sees none of it.
    key = await sm.other_tenant()
    stranger = sm.client(sm.token("b-admin", "admin", key=key))
    assert list((await stranger.sessions.list_study_room_logs(user_id=u1)).logs) == []
    foreign = await stranger.sessions.list_study_room_logs(session_id=r1.session_id)
    assert (list(foreign.logs), foreign.total_size) == ([], 0)

    # Students may read their own logs only.
    own, _ = await _logs(c2, user_id=u2)
    assert {x.user_id for x in own} == {u2}
    await expect_error(
        c2.sessions.list_study_room_logs(user_id=u1, retry=NO_RETRY),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
