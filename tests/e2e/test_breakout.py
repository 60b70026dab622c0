"""BreakoutService end to end through `classmesh up` and the SDK (seed 000 STR-012..017):
the STR-017 flow, the STR-015/016 error tables, capacity under concurrency, idempotency,
auto-close by time limit, session end, chat isolation between rooms, WatchBreakoutRooms
resume."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aiortc.mediastreams import MediaStreamError

from classmesh.breakout.v1 import breakout_pb2, breakout_service_pb2
from classmesh.session.v1 import session_pb2
from classmesh_sdk import ClassMeshClient, MediaSession
from tests.support.classroom import (
    Feed,
    Mesh,
    classroom_mesh,
    db_events,
    expect_error,
    kind,
    live_class,
    scope,
    uid,
)
from tests.support.media import LOOPBACK, publisher, subscriber, video_frame

Code = grpc.StatusCode
B = breakout_pb2


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with classroom_mesh(
        admin_database_url,
        redis_url,
        tmp_path_factory,
        "breakout",
        extra_env={
            "CLASSMESH_MEDIA_ICE_HOSTS": "127.0.0.1",
            "CLASSMESH_INTERACTION_SWEEP_INTERVAL_SECONDS": "0.5",
            "CLASSMESH_BREAKOUT_SWEEP_INTERVAL_SECONDS": "0.5",
        },
    ) as m:
        yield m


async def _watch(client: ClassMeshClient, sid: str, after: int, n: int) -> list[Any]:
    out: list[Any] = []
    async for item in client.breakouts.watch_breakout_rooms(session_id=sid, after_seq=after):
        out.append(item.event)
        if len(out) >= n:
            break
    return out


async def test_str017_flow_three_rooms_nine_students(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=9)
    inst = klass.inst
    students = sorted(klass.students)
    main_feed = Feed(inst, klass.id)
    created = await inst.breakouts.create_breakout_rooms(
        session_id=klass.id, auto_assign=B.AutoAssign(room_count=3, seed=42)
    )
    rooms = list(created.rooms)
    assert [r.name for r in rooms] == ["Room 1", "Room 2", "Room 3"]
    assert [r.participant_count for r in rooms] == [3, 3, 3]
    assert created.seed == 42 and not created.unassigned_user_ids
    members = {r.id: sorted(p.user_id for p in r.participants) for r in rooms}
    assert sorted(u for us in members.values() for u in us) == students
    # Every room got its own media router (MediaService.CreateRouter).
    assert all(r.router_id for r in rooms), rooms
    routers = (await inst.media.list_routers(session_id=klass.id)).routers
    assert {r.breakout_room_id for r in routers} >= {r.id for r in rooms}
    # The same seed and participant set always gives the same rooms (deterministic).
    listed = await inst.breakouts.list_breakout_rooms(
        session_id=klass.id, include_participants=True
    )
    assert listed.assigned_count == 9 and listed.total_size == 3
    assert {r.id: sorted(p.user_id for p in r.participants) for r in listed.rooms} == members
    # Each student sees their own room (SessionService reads the same assignments).
    for room_id, users in members.items():
        for u in users:
            me = await klass.students[u].sessions.get_participant(session_id=klass.id, user_id=u)
            assert me.participant.breakout_room_id == room_id
    # Chat stays in its room; the broadcast reaches every room.
    feeds = {rid: Feed(klass.students[us[0]], klass.id, rid) for rid, us in members.items()}
    for f in feeds.values():
        await f.ready()
    first = rooms[0].id
    await klass.students[members[first][1]].interaction.send_chat_message(
        scope=scope(klass.id, first), text="only room 1"
    )
    await feeds[first].wait_for(lambda e: kind(e) == "chat_message_posted")
    sent = await inst.breakouts.broadcast_to_breakout_rooms(
        session_id=klass.id, text="2 minutes remaining"
    )
    assert sorted(sent.message.breakout_room_ids) == sorted(members)
    for f in feeds.values():
        await f.quiet(0.2)
    every_student_feed = [
        Feed(klass.students[u], klass.id, rid, include_session_events=True)
        for rid, us in members.items()
        for u in us
    ]
    for f in every_student_feed:
        e = await f.wait_for(lambda e: kind(e) == "breakout_broadcast", what="broadcast")
        assert e.breakout_broadcast.message.text == "2 minutes remaining"
    for rid, f in feeds.items():
        chats = f.of("chat_message_posted")
        assert [c.breakout_room_id for c in chats] == ([first] if rid == first else [])
    # Close all: everyone back in the main room, media too.
    closed = await inst.breakouts.close_all_breakout_rooms(session_id=klass.id)
    assert sorted(closed.returned_user_ids) == students
    assert {r.status for r in closed.rooms} == {B.BREAKOUT_ROOM_STATUS_CLOSED}
    assert {r.close_reason for r in closed.rooms} == {B.CLOSE_REASON_ALL_CLOSED}
    for u in students:
        me = await klass.students[u].sessions.get_participant(session_id=klass.id, user_id=u)
        assert me.participant.breakout_room_id == ""
    await klass.students[students[0]].interaction.send_chat_message(
        scope=scope(klass.id), text="back in main"
    )
    await main_feed.wait_for(lambda e: kind(e) == "chat_message_posted" and not e.breakout_room_id)
    # Every change is in the log in order, session-wide.
    types = [r["type"] for r in await db_events(mesh.pool, klass.id)]
    assert types.index("breakout_rooms_created") < types.index("breakout_broadcast")
    assert types.index("breakout_broadcast") < types.index("breakout_rooms_closed")
    audit = await mesh.pool.fetch(
        "SELECT action FROM audit_logs WHERE session_id = $1 ORDER BY created_at",
        uuid.UUID(klass.id),
    )
    assert {"breakout_rooms_created", "breakout_rooms_closed"} <= {a["action"] for a in audit}
    # ...and the audit API names every one of them (none UNSPECIFIED).
    logged = await klass.inst.sessions.list_audit_logs(session_id=klass.id, page_size=100)
    actions = {e.action for e in logged.entries}
    assert {
        session_pb2.AUDIT_ACTION_BREAKOUT_ROOMS_CREATED,
        session_pb2.AUDIT_ACTION_BREAKOUT_ROOMS_CLOSED,
    } <= actions
    assert session_pb2.AUDIT_ACTION_UNSPECIFIED not in actions
    for f in [main_feed, *feeds.values(), *every_student_feed]:
        await f.stop()


async def test_error_tables(mesh: Mesh) -> None:
    """STR-015 / STR-016 error scenarios, each with its code and reason."""
    klass = await live_class(mesh, students=3)
    inst = klass.inst
    a, b, c = sorted(klass.students)
    stud = klass.students[a]
    # Students cannot create rooms (instructorOnly).
    await expect_error(
        stud.breakouts.create_breakout_rooms(
            session_id=klass.id, auto_assign=B.AutoAssign(room_count=2)
        ),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    # More than 49 rooms (main + 49 routers): RESOURCE_EXHAUSTED.
    await expect_error(
        inst.breakouts.create_breakout_rooms(
            session_id=klass.id, auto_assign=B.AutoAssign(room_count=11)
        ),
        Code.RESOURCE_EXHAUSTED,
        "BREAKOUT_LIMIT_REACHED",  # this class allows 10 (max_breakout_rooms)
    )
    big = await live_class(mesh, settings=session_pb2.SessionSettings(lobby_enabled=False))
    await expect_error(
        big.inst.breakouts.create_breakout_rooms(
            session_id=big.id, auto_assign=B.AutoAssign(room_count=50)
        ),
        Code.RESOURCE_EXHAUSTED,
        "BREAKOUT_LIMIT_REACHED",
    )
    # Bad input.
    await expect_error(
        inst.breakouts.create_breakout_rooms(
            session_id=klass.id,
            explicit=explicit([("A", 1, [])]),
        ),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    await expect_error(
        inst.breakouts.create_breakout_rooms(
            session_id=klass.id,
            explicit=explicit([("A", 2, [a]), ("B", 2, [a])]),
        ),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    await expect_error(
        inst.breakouts.create_breakout_rooms(
            session_id=klass.id,
            auto_assign=B.AutoAssign(room_count=1),
            time_limit={"seconds": 30},
        ),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    # Broadcast to zero active rooms.
    await expect_error(
        inst.breakouts.broadcast_to_breakout_rooms(session_id=klass.id, text="hello"),
        Code.FAILED_PRECONDITION,
        "NO_ACTIVE_BREAKOUTS",
    )
    # Assign: a participant not in the session is skipped (STR-015 404 row: skip).
    created = await inst.breakouts.create_breakout_rooms(
        session_id=klass.id,
        explicit=explicit([("A", 2, [a, "nobody-here"]), ("B", 2, [])]),
    )
    assert created.skipped_user_ids == ["nobody-here"]
    room_a, room_b = created.rooms
    assert sorted(created.unassigned_user_ids) == sorted([b, c])
    assigned = await inst.breakouts.assign_participants(
        session_id=klass.id, breakout_room_id=room_b.id, user_ids=[b, "ghost"]
    )
    assert assigned.skipped_user_ids == ["ghost"] and assigned.room.participant_count == 1
    # Create while rooms are active: 409 -> FAILED_PRECONDITION BREAKOUTS_ACTIVE.
    await expect_error(
        inst.breakouts.create_breakout_rooms(
            session_id=klass.id, auto_assign=B.AutoAssign(room_count=2)
        ),
        Code.FAILED_PRECONDITION,
        "BREAKOUTS_ACTIVE",
    )
    # Capacity: room A (2 seats) has a; b and c together do not fit.
    await expect_error(
        inst.breakouts.assign_participants(
            session_id=klass.id, breakout_room_id=room_a.id, user_ids=[b, c]
        ),
        Code.RESOURCE_EXHAUSTED,
        "ROOM_FULL",
    )
    # Move to a room that does not exist: NOT_FOUND.
    await expect_error(
        inst.breakouts.move_participant(
            session_id=klass.id, user_id=a, to_breakout_room_id=str(uuid.uuid4())
        ),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )
    await expect_error(
        inst.breakouts.move_participant(session_id=klass.id, user_id="nobody"),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )
    # A student enters only their own room; may not leave on their own.
    await expect_error(
        stud.breakouts.join_breakout_room(session_id=klass.id, breakout_room_id=room_b.id),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    joined = await stud.breakouts.join_breakout_room(session_id=klass.id)
    assert joined.room.id == room_a.id and joined.router_id
    await expect_error(
        stud.breakouts.leave_breakout_room(session_id=klass.id),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    # Extend beyond 120 minutes / a room without a limit.
    await expect_error(
        inst.breakouts.extend_breakout_rooms(session_id=klass.id, additional={"seconds": 600}),
        Code.FAILED_PRECONDITION,
        "NO_ACTIVE_BREAKOUTS",
    )
    # Close a room: idempotent, a closed room stays closed (200 when already closed).
    closed = await inst.breakouts.close_breakout_room(breakout_room_id=room_a.id)
    assert closed.returned_user_ids == [a]
    assert closed.room.close_reason == B.CLOSE_REASON_MANUAL
    again = await inst.breakouts.close_breakout_room(breakout_room_id=room_a.id)
    assert again.room.status == B.BREAKOUT_ROOM_STATUS_CLOSED and not again.returned_user_ids
    await expect_error(
        inst.breakouts.close_breakout_room(breakout_room_id=str(uuid.uuid4())),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )
    await expect_error(
        inst.breakouts.assign_participants(
            session_id=klass.id, breakout_room_id=room_a.id, user_ids=[c]
        ),
        Code.FAILED_PRECONDITION,
        "BREAKOUT_ROOM_CLOSED",
    )
    # Close all twice: the second closes nothing and succeeds.
    first = await inst.breakouts.close_all_breakout_rooms(session_id=klass.id)
    assert [r.id for r in first.rooms] == [room_b.id]
    second = await inst.breakouts.close_all_breakout_rooms(session_id=klass.id)
    assert not second.rooms and not second.returned_user_ids
    # A session that is not live.
    await inst.sessions.end_session(session_id=klass.id)
    await expect_error(
        inst.breakouts.create_breakout_rooms(
            session_id=klass.id, auto_assign=B.AutoAssign(room_count=1)
        ),
        Code.FAILED_PRECONDITION,
        "SESSION_ENDED",
    )


def explicit(rooms: list[tuple[str, int, list[str]]]) -> breakout_service_pb2.ExplicitRooms:
    return breakout_service_pb2.ExplicitRooms(
        rooms=[B.BreakoutRoomSpec(name=n, capacity=cap, user_ids=u) for n, cap, u in rooms]
    )


async def test_capacity_exact_under_concurrency_and_idempotency(mesh: Mesh) -> None:
    n, k = 3, 5
    klass = await live_class(mesh, students=n + k)
    inst = klass.inst
    created = await inst.breakouts.create_breakout_rooms(
        session_id=klass.id, explicit=explicit([("Small", n, [])])
    )
    room = created.rooms[0]
    users = sorted(klass.students)
    results = await asyncio.gather(
        *(
            inst.breakouts.assign_participants(
                session_id=klass.id, breakout_room_id=room.id, user_ids=[u], retry=None
            )
            for u in users
        ),
        return_exceptions=True,
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(ok) == n, results
    assert {getattr(e, "reason", "") for e in errors} == {"ROOM_FULL"}
    got = await inst.breakouts.get_breakout_room(breakout_room_id=room.id)
    assert got.room.participant_count == n and len(got.room.participants) == n
    # Idempotency: the same request_id returns the stored answer, with no second event.
    rid = uid("mv")
    mover = got.room.participants[0].user_id
    first = await inst.breakouts.move_participant(
        request_id=rid, session_id=klass.id, user_id=mover
    )
    before = len(await db_events(mesh.pool, klass.id))
    again = await inst.breakouts.move_participant(
        request_id=rid, session_id=klass.id, user_id=mover
    )
    assert again == first and first.from_breakout_room_id == room.id
    assert len(await db_events(mesh.pool, klass.id)) == before
    await expect_error(
        inst.breakouts.move_participant(
            request_id=rid, session_id=klass.id, user_id=users[-1], retry=None
        ),
        Code.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    await inst.breakouts.close_all_breakout_rooms(session_id=klass.id)


async def test_time_limit_auto_close_and_watch_resume(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=2)
    inst = klass.inst
    a, b = sorted(klass.students)
    created = await inst.breakouts.create_breakout_rooms(
        session_id=klass.id,
        explicit=explicit([("Timed", 2, [a]), ("Open", 2, [b])]),
        time_limit={"seconds": 60},
    )
    timed, other = created.rooms
    assert timed.time_limit.seconds == 60 and timed.HasField("closes_at")
    ext = await inst.breakouts.extend_breakout_rooms(
        session_id=klass.id, breakout_room_ids=[timed.id], additional={"seconds": 120}
    )
    assert ext.rooms[0].time_limit.seconds == 180
    ext = await inst.breakouts.extend_breakout_rooms(
        session_id=klass.id, additional={"seconds": 3600}
    )
    assert [r.time_limit.seconds for r in ext.rooms] == [63 * 60, 61 * 60]
    await expect_error(
        inst.breakouts.extend_breakout_rooms(
            session_id=klass.id, breakout_room_ids=[timed.id], additional={"seconds": 3600}
        ),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    # The sweeper closes a room whose time is up: bring its end to now (a minute is the
    # shortest limit the API takes).
    await mesh.pool.execute(
        "UPDATE breakout_rooms SET opened_at = now() - interval '5 minutes', "
        "closes_at = now() + interval '1 second' WHERE id = $1",
        uuid.UUID(timed.id),
    )
    events = await _watch(a_client := klass.students[a], klass.id, 0, 4)
    assert [kind(e) for e in events] == [
        "breakout_rooms_created",
        "breakout_rooms_extended",
        "breakout_rooms_extended",
        "breakout_room_closed",
    ]
    closed = events[3].breakout_room_closed
    assert closed.room.close_reason == B.CLOSE_REASON_TIME_LIMIT and closed.returned_user_ids == [a]
    assert events[3].actor.kind == 2  # ACTOR_KIND_SYSTEM
    me = await a_client.sessions.get_participant(session_id=klass.id, user_id=a)
    assert me.participant.breakout_room_id == ""
    got = await inst.breakouts.get_breakout_room(breakout_room_id=other.id)
    assert got.room.status == B.BREAKOUT_ROOM_STATUS_OPEN
    # Resume after the third event: only the fourth again.
    resumed = await _watch(a_client, klass.id, events[2].seq, 1)
    assert [e.seq for e in resumed] == [events[3].seq]
    # Session end closes the remaining rooms; the watch ends with the session.
    await inst.sessions.end_session(session_id=klass.id)
    got = await inst.breakouts.get_breakout_room(breakout_room_id=other.id)
    assert got.room.status == B.BREAKOUT_ROOM_STATUS_CLOSED
    assert got.room.close_reason == B.CLOSE_REASON_SESSION_ENDED
    tail = [r.event async for r in inst.breakouts.watch_breakout_rooms(session_id=klass.id)]
    assert kind(tail[-1]) == "breakout_rooms_closed"
    assert tail[-1].breakout_rooms_closed.breakout_room_ids == [other.id]
    assert tail[-1].breakout_rooms_closed.returned_user_ids == [b]


async def test_join_move_and_lobby(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=2)
    inst = klass.inst
    a, b = sorted(klass.students)
    created = await inst.breakouts.create_breakout_rooms(
        session_id=klass.id,
        explicit=explicit([("One", 2, [a]), ("Two", 2, [])]),
        move_immediately=False,
    )
    one, two = created.rooms
    assert one.participants[0].user_id == a and not one.participants[0].HasField("joined_at")
    joined = await klass.students[a].breakouts.join_breakout_room(session_id=klass.id)
    assert joined.room.participants[0].HasField("joined_at")
    moved = await inst.breakouts.move_participant(
        session_id=klass.id, user_id=a, to_breakout_room_id=two.id
    )
    assert moved.from_breakout_room_id == one.id and moved.to_room.participant_count == 1
    # A moderator visits any room and leaves it again.
    visit = await inst.breakouts.join_breakout_room(session_id=klass.id, breakout_room_id=one.id)
    assert visit.room.id == one.id
    left = await inst.breakouts.leave_breakout_room(session_id=klass.id)
    assert left.breakout_room_id == one.id
    await inst.breakouts.close_all_breakout_rooms(session_id=klass.id)


async def _decodes(track: Any, frames: int = 5) -> None:
    for _ in range(frames):
        await video_frame(track, 5)


async def _flowing_video(media: MediaSession, timeout: float = 15) -> Any:
    """The first new remote video track of `media` that decodes frames. A track of a
    subscriber connection replaced meanwhile (moves of several members run concurrently)
    ends; the connection that replaced it brings the same tracks again."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        assert left > 0, "no remote video track decoded"
        track = await media.next_remote_track(timeout=left)
        if track.kind != "video":
            continue
        try:
            await _decodes(track)
        except MediaStreamError:
            continue
        return track


async def _silent(track: Any) -> None:
    """Nothing more arrives on `track` (ended, or silent after what was queued)."""
    with pytest.raises((TimeoutError, MediaStreamError)):
        for _ in range(200):
            await asyncio.wait_for(track.recv(), 1.5)


async def test_media_follows_the_breakout_rooms(mesh: Mesh) -> None:
    """Real aiortc peers: opening rooms moves each student's media into its room (a room
    hears only its own members), closing them brings everyone back to the teacher."""
    klass = await live_class(mesh, students=3)
    a, b, c = sorted(klass.students)
    teacher, teacher_tracks = await publisher(klass.inst, klass.id)
    talker, _ = await publisher(klass.students[b], klass.id)
    listener, heard = await subscriber(klass.students[a], klass.id)
    other = MediaSession(klass.students[c], klass.id, ice_hosts=LOOPBACK)
    try:
        assert {t.id for t in await listener.wait_tracks(4)} >= {t.id for t in teacher_tracks}
        await _decodes(heard["video"])
        await other.start()
        await other.wait_tracks(4)
        created = await klass.inst.breakouts.create_breakout_rooms(
            session_id=klass.id,
            explicit=breakout_service_pb2.ExplicitRooms(
                rooms=[B.BreakoutRoomSpec(user_ids=[a, b]), B.BreakoutRoomSpec(user_ids=[c])]
            ),
        )
        room_ab, room_c = (r.id for r in created.rooms)
        # a and b are moved into their room; the teacher's media stops reaching a.
        await listener.wait_moved(1)
        await talker.wait_moved(1)
        await other.wait_moved(1)
        assert (listener.breakout_room_id, other.breakout_room_id) == (room_ab, room_c)
        in_room = await listener.wait_tracks(2)
        assert {t.user_id for t in in_room} == {b}
        assert {t.breakout_room_id for t in in_room} == {room_ab}
        await _silent(heard["video"])
        await listener.subscribe([t.id for t in in_room])
        from_b = await _flowing_video(listener)
        # c's room is its own: nothing of a, b or the teacher is announced there.
        await asyncio.sleep(1)
        assert other.tracks == {}
        routers = {
            r.breakout_room_id: r
            for r in (await klass.inst.media.list_routers(session_id=klass.id)).routers
        }
        assert {room_ab, room_c} <= set(routers)
        # Close all: everyone is back in the main room with the teacher.
        await klass.inst.breakouts.close_all_breakout_rooms(session_id=klass.id)
        await listener.wait_moved(2)
        assert listener.breakout_room_id == ""
        back = await listener.wait_tracks(4)
        from_teacher = [t.id for t in back if t.user_id == klass.teacher]
        assert len(from_teacher) == 2
        await listener.subscribe(from_teacher)
        await _flowing_video(listener)
        await _silent(from_b)
    finally:
        for media in (other, listener, talker, teacher):
            await media.close()
