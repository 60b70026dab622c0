"""Presence and live feeds: heartbeats, disconnect -> grace -> left, reconnect, resume, kick.

The mesh runs with ~1 s presence timings (environment, see PRESENCE_ENV); the tests read the
effective heartbeat interval and grace from JoinSession's response and wait in multiples of
them, never asserting wall-clock speed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from classmesh.common.v1 import common_pb2
from classmesh.events.v1 import events_pb2
from classmesh_sdk import NO_RETRY, ClassMeshError
from tests.e2e.test_session_lifecycle import (
    STUDY_ROOM,
    Code,
    S,
    SessionMesh,
    Watcher,
    about,
    all_events,
    create_session,
    db_participants,
    db_session,
    event_type,
    expect_error,
    live_class,
    session_mesh,
    uid,
)

#: ~1 s timings so a disconnect -> left cycle takes a few seconds.
PRESENCE_ENV = {
    "CLASSMESH_PRESENCE_GRACE_SECONDS": "1",
    "CLASSMESH_HEARTBEAT_INTERVAL_SECONDS": "0.5",
    "CLASSMESH_HEARTBEAT_TIMEOUT_SECONDS": "1",
    "CLASSMESH_PRESENCE_SWEEP_INTERVAL_SECONDS": "0.2",
    "CLASSMESH_RATE_LIMIT_PER_MINUTE": "0",
}


@pytest.fixture(scope="module")
async def sm(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SessionMesh]:
    async with session_mesh(
        admin_database_url, redis_url, tmp_path_factory, "presence", PRESENCE_ENV
    ) as m:
        yield m


def _timings(resp: object) -> tuple[float, float]:
    hb = resp.heartbeat_interval.ToTimedelta().total_seconds()  # type: ignore[attr-defined]
    grace = resp.reconnect_grace.ToTimedelta().total_seconds()  # type: ignore[attr-defined]
    assert 0 < hb <= 2 and 0 < grace <= 2, f"mesh not started with short timings: {hb} {grace}"
    return hb, grace


async def test_heartbeats_keep_a_participant_present(sm: SessionMesh) -> None:
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=5)
    user = uid("steady")
    c = sm.as_user(user)
    joined = await c.sessions.join_session(session_id=room.id)
    hb, grace = _timings(joined)
    loop = asyncio.get_running_loop()
    end = loop.time() + 3 * hb + 2 * grace
    while loop.time() < end:
        beat = await c.sessions.heartbeat(session_id=room.id)
        assert beat.status == S.PARTICIPANT_STATUS_ADMITTED
        assert beat.session_status in (S.SESSION_STATUS_SCHEDULED, S.SESSION_STATUS_LIVE)
        assert beat.presence_expire_time.ToDatetime() > joined.participant.joined_at.ToDatetime()
        await asyncio.sleep(hb / 3)
    types = [event_type(e) for e in await all_events(sm.admin(), room.id)]
    assert "participant_disconnected" not in types and "participant_left" not in types
    p = (await c.sessions.get_participant(session_id=room.id)).participant
    assert (p.status, p.connection_state) == (
        S.PARTICIPANT_STATUS_ADMITTED,
        S.CONNECTION_STATE_CONNECTED,
    )
    assert (await db_participants(sm.pool, room.id))[user]["status"] == "admitted"


async def test_silence_disconnects_then_leaves_after_grace(sm: SessionMesh) -> None:
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=5)
    watch = Watcher(sm.admin("watcher"), room.id)
    user = uid("quiet")
    c = sm.as_user(user)
    joined = await c.sessions.join_session(session_id=room.id)
    hb, grace = _timings(joined)
    await c.sessions.heartbeat(session_id=room.id)
    # Silence: DISCONNECTED (seat still held) ...
    d = await watch.wait_for(
        about(user, "participant_disconnected"), 4 * hb + 5, "participant_disconnected"
    )
    assert d.participant_disconnected.participant.status == S.PARTICIPANT_STATUS_DISCONNECTED
    assert d.actor.kind == common_pb2.ACTOR_KIND_SYSTEM
    grace_end = d.participant_disconnected.grace_expire_time.ToDatetime()
    assert abs((grace_end - d.time.ToDatetime()).total_seconds() - grace) < 1
    row = (await db_participants(sm.pool, room.id))[user]
    if row["status"] == "disconnected":
        assert (await db_session(sm.pool, room.id))["current_occupancy"] == 1
    # ... then LEFT once the grace window is over.
    left = await watch.wait_for(about(user, "participant_left"), grace + 5, "participant_left")
    assert left.participant_left.grace_expired
    assert left.participant_left.participant.status == S.PARTICIPANT_STATUS_LEFT
    assert left.participant_left.current_occupancy == 0
    assert left.seq > d.seq
    waited = (left.time.ToDatetime() - d.time.ToDatetime()).total_seconds()
    assert waited >= grace - 0.2, waited
    rows = await db_participants(sm.pool, room.id)
    assert rows[user]["status"] == "left" and rows[user]["left_at"] is not None
    assert (await db_session(sm.pool, room.id))["current_occupancy"] == 0
    got = (await sm.admin().sessions.get_participant(session_id=room.id, user_id=user)).participant
    assert got.status == S.PARTICIPANT_STATUS_LEFT
    # The unexpected disconnect still ends the visit in a session log row.
    logs = await sm.pool.fetch(
        "SELECT * FROM session_logs WHERE session_id = $1 AND user_id = $2",
        uuid.UUID(room.id),
        user,
    )
    assert len(logs) == 1
    assert logs[0]["reason"] == "disconnected"
    await watch.stop()


async def test_reconnect_within_grace_keeps_the_participant(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm, capacity=5)
    watch = Watcher(sm.admin("watcher"), s.id)
    user = uid("flaky")
    c = sm.as_user(user)
    joined = await c.sessions.join_session(session_id=s.id)
    hb, grace = _timings(joined)
    await inst.sessions.admit_participants(session_id=s.id, user_ids=[user])
    await watch.wait_for(about(user, "participant_disconnected"), 4 * hb + 5, "disconnect")
    again = await c.sessions.join_session(session_id=s.id)
    assert again.reconnected
    assert again.participant.id == joined.participant.id
    assert again.status == S.PARTICIPANT_STATUS_ADMITTED  # not back to the lobby
    assert again.participant.join_count == 2
    r = await watch.wait_for(about(user, "participant_reconnected"), 5, "participant_reconnected")
    assert r.participant_reconnected.participant.status == S.PARTICIPANT_STATUS_ADMITTED
    # Keep beating past the old grace deadline: no participant_left.
    loop = asyncio.get_running_loop()
    end = loop.time() + grace + 2 * hb
    while loop.time() < end:
        await c.sessions.heartbeat(session_id=s.id)
        await asyncio.sleep(hb / 3)
    mine = [e for e in watch.events if about(user, "participant_left")(e)]
    assert mine == []
    row = (await db_participants(sm.pool, s.id))[user]
    assert (row["status"], row["join_count"]) == ("admitted", 2)
    assert (await db_session(sm.pool, s.id))["current_occupancy"] == 1
    await watch.stop()


async def test_silent_lobby_participant_frees_the_seat(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm, capacity=5)
    watch = Watcher(inst, s.id)
    user = uid("shy")
    joined = await sm.as_user(user).sessions.join_session(session_id=s.id)
    assert joined.status == S.PARTICIPANT_STATUS_LOBBY
    hb, grace = _timings(joined)
    await watch.wait_for(about(user, "participant_left"), 4 * hb + grace + 5, "participant_left")
    got = (await inst.sessions.get_session(session_id=s.id)).session
    assert (got.lobby_count, got.current_occupancy) == (0, 0)
    await watch.stop()


async def _read(gen: AsyncIterator[object], until_seq: int, timeout: float) -> list[int]:
    seqs: list[int] = []
    while not seqs or seqs[-1] < until_seq:
        item = await asyncio.wait_for(gen.__anext__(), timeout)
        seqs.append(item.event.seq)  # type: ignore[attr-defined]
    return seqs


async def test_watch_resume_with_after_seq_gets_every_event_once_in_order(
    sm: SessionMesh,
) -> None:
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=50)
    admin = sm.admin()
    users = [uid("w") for _ in range(6)]
    clients = {u: sm.as_user(u) for u in users}
    for u in users[:3]:
        await clients[u].sessions.join_session(session_id=room.id)
    head = (await admin.sessions.get_session(session_id=room.id)).session.last_seq
    assert head >= 4

    # First connection: replay, then live, then the connection drops.
    first_client = sm.client(sm.token("viewer", "admin"))
    gen = first_client.sessions.watch_session(session_id=room.id, after_seq=0, retry=NO_RETRY)
    seen = await _read(gen, head, 10)
    await clients[users[3]].sessions.join_session(session_id=room.id)
    head = (await admin.sessions.get_session(session_id=room.id)).session.last_seq
    seen += await _read(gen, head, 10)
    await first_client.close()  # the drop
    await gen.aclose()

    # While away: more events.
    await clients[users[0]].sessions.leave_session(session_id=room.id)
    await clients[users[4]].sessions.join_session(session_id=room.id)
    await admin.sessions.mute_participant(session_id=room.id, user_id=users[1], audio=True)
    # Resume from the last seq received: the missed ones, then live ones.
    second = sm.client(sm.token("viewer", "admin"))
    gen2 = second.sessions.watch_session(session_id=room.id, after_seq=seen[-1], retry=NO_RETRY)
    head = (await admin.sessions.get_session(session_id=room.id)).session.last_seq
    seen += await _read(gen2, head, 10)
    await clients[users[5]].sessions.join_session(session_id=room.id)
    await clients[users[2]].sessions.leave_session(session_id=room.id)
    head = (await admin.sessions.get_session(session_id=room.id)).session.last_seq
    seen += await _read(gen2, head, 10)
    await gen2.aclose()

    assert seen == list(range(1, head + 1))
    log = await all_events(admin, room.id)
    assert [e.seq for e in log] == seen


async def test_kick_closes_the_kicked_users_stream(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm, capacity=10)
    kid, stays = uid("kicked"), uid("stays")
    kc, sc = sm.as_user(kid), sm.as_user(stays)
    await kc.sessions.join_session(session_id=s.id)
    await sc.sessions.join_session(session_id=s.id)
    await inst.sessions.admit_participants(session_id=s.id, all=True)
    head = (await inst.sessions.get_session(session_id=s.id)).session.last_seq
    kicked_watch = Watcher(kc, s.id, after_seq=head)
    other_watch = Watcher(sc, s.id, after_seq=head)
    staff_watch = Watcher(inst, s.id, after_seq=head)
    await asyncio.sleep(0.3)
    assert not kicked_watch.ended
    await inst.sessions.remove_participant(session_id=s.id, user_id=kid, reason="kick")
    await kicked_watch.wait_ended(5)
    if kicked_watch.error is not None:
        assert (kicked_watch.error.code, kicked_watch.error.reason) == (
            Code.PERMISSION_DENIED,
            "PARTICIPANT_REMOVED",
        )
    # Everybody else keeps streaming and sees the removal.
    for w in (other_watch, staff_watch):
        e = await w.wait_for(about(kid, "participant_removed"), 5, "participant_removed")
        assert e.participant_removed.reason == "kick"
        assert not w.ended
    # The kicked user cannot open a new stream.
    kicked_again = Watcher(kc, s.id)
    await kicked_again.wait_ended(5)
    assert kicked_again.error is not None
    assert (kicked_again.error.code, kicked_again.error.reason) == (
        Code.PERMISSION_DENIED,
        "PARTICIPANT_REMOVED",
    )
    assert kicked_again.events == []
    for w in (other_watch, staff_watch):
        await w.stop()
    await expect_error(
        kc.sessions.heartbeat(session_id=s.id, retry=NO_RETRY),
        Code.PERMISSION_DENIED,
        "PARTICIPANT_REMOVED",
    )


async def test_watch_replays_from_the_start_and_rejects_a_cursor_beyond_the_log(
    sm: SessionMesh,
) -> None:
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=5)
    w = Watcher(sm.admin(), room.id)
    first = await w.wait_for(lambda e: e.seq == 1, 5, "seq 1")
    assert isinstance(first, events_pb2.Event)
    assert event_type(first) == "session_created"
    assert first.session_created.session.id == room.id
    await w.stop()
    with pytest.raises(ClassMeshError) as info:
        async for _ in sm.admin().sessions.watch_session(
            session_id=room.id, after_seq=10_000, retry=NO_RETRY, timeout=5
        ):
            break
    assert (info.value.code, info.value.reason) == (Code.INVALID_ARGUMENT, "VALIDATION_FAILED")


# ============================================================================ edge cases


async def _disconnected(sm: SessionMesh, sid: str, user: str, watch: Watcher) -> float:
    """Join `user`, stay silent until DISCONNECTED; return the grace window."""
    joined = await sm.as_user(user).sessions.join_session(session_id=sid)
    hb, grace = _timings(joined)
    await watch.wait_for(about(user, "participant_disconnected"), 4 * hb + 5, "disconnect")
    assert (await db_participants(sm.pool, sid))[user]["status"] == "disconnected"
    return grace


async def _quiet_period(grace: float) -> None:
    """Long enough for the sweeper to expire any grace window that is still running."""
    await asyncio.sleep(grace + 1.5)


async def test_kick_during_grace_frees_the_seat_once(sm: SessionMesh) -> None:
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=3)
    watch = Watcher(sm.admin("watcher"), room.id)
    user = uid("ghost")
    grace = await _disconnected(sm, room.id, user, watch)
    assert (await db_session(sm.pool, room.id))["current_occupancy"] == 1
    await sm.admin().sessions.remove_participant(session_id=room.id, user_id=user, reason="x")
    assert (await db_session(sm.pool, room.id))["current_occupancy"] == 0
    await _quiet_period(grace)
    assert (await db_participants(sm.pool, room.id))[user]["status"] == "removed"
    assert (await db_session(sm.pool, room.id))["current_occupancy"] == 0
    assert [e for e in watch.events if about(user, "participant_left")(e)] == []
    logs = await sm.pool.fetch(
        "SELECT reason FROM session_logs WHERE session_id = $1 AND user_id = $2",
        uuid.UUID(room.id),
        user,
    )
    assert [r["reason"] for r in logs] == ["removed"]
    await watch.stop()


async def test_leave_during_grace_frees_the_seat_once(sm: SessionMesh) -> None:
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=3)
    watch = Watcher(sm.admin("watcher"), room.id)
    user = uid("leaver")
    grace = await _disconnected(sm, room.id, user, watch)
    left = await sm.as_user(user).sessions.leave_session(session_id=room.id)
    assert left.participant.status == S.PARTICIPANT_STATUS_LEFT
    await _quiet_period(grace)
    assert (await db_session(sm.pool, room.id))["current_occupancy"] == 0
    lefts = [e for e in watch.events if about(user, "participant_left")(e)]
    assert len(lefts) == 1 and not lefts[0].participant_left.grace_expired
    count = await sm.pool.fetchval(
        "SELECT count(*) FROM session_logs WHERE session_id = $1 AND user_id = $2",
        uuid.UUID(room.id),
        user,
    )
    assert count == 1
    await watch.stop()


async def test_end_during_grace_settles_everyone(sm: SessionMesh) -> None:
    s, _, inst = await live_class(sm, capacity=5)
    watch = Watcher(inst, s.id)
    user = uid("dropped")
    joined = await sm.as_user(user).sessions.join_session(session_id=s.id)
    hb, grace = _timings(joined)
    await inst.sessions.admit_participants(session_id=s.id, user_ids=[user])
    await watch.wait_for(about(user, "participant_disconnected"), 4 * hb + 5, "disconnect")
    ended = await inst.sessions.end_session(session_id=s.id)
    assert ended.session.current_occupancy == 0
    head = (await db_session(sm.pool, s.id))["last_seq"]
    await _quiet_period(grace)
    row = await db_session(sm.pool, s.id)
    assert (row["status"], row["current_occupancy"], row["last_seq"]) == ("ended", 0, head)
    assert (await db_participants(sm.pool, s.id))[user]["status"] == "left"
    await watch.stop()


async def test_a_disconnected_participant_keeps_the_seat_of_a_full_room(sm: SessionMesh) -> None:
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=1)
    watch = Watcher(sm.admin("watcher"), room.id)
    holder, other = uid("holder"), uid("other")
    await _disconnected(sm, room.id, holder, watch)
    await expect_error(
        sm.as_user(other).sessions.join_session(session_id=room.id, retry=NO_RETRY),
        Code.RESOURCE_EXHAUSTED,
        "ROOM_FULL",
    )
    back = await sm.as_user(holder).sessions.join_session(session_id=room.id)
    assert back.reconnected and back.status == S.PARTICIPANT_STATUS_ADMITTED
    # Silent again: after the grace window the seat is free for the other user.
    await watch.wait_for(
        lambda e: about(holder, "participant_left")(e) and e.participant_left.grace_expired,
        10,
        "holder left",
    )
    ok = await sm.as_user(other).sessions.join_session(session_id=room.id)
    assert ok.status == S.PARTICIPANT_STATUS_ADMITTED
    await watch.stop()


async def test_an_open_watch_stream_keeps_presence(sm: SessionMesh) -> None:
    room = await create_session(sm.admin(), kind=STUDY_ROOM, capacity=3)
    staff = Watcher(sm.admin("watcher"), room.id)
    user = uid("viewer")
    c = sm.as_user(user)
    joined = await c.sessions.join_session(session_id=room.id)
    hb, grace = _timings(joined)
    mine = Watcher(c, room.id, after_seq=joined.last_seq)
    await asyncio.sleep(4 * hb + grace + 1)  # no heartbeats, but the stream is open
    assert [e for e in staff.events if about(user, "participant_disconnected")(e)] == []
    assert (await db_participants(sm.pool, room.id))[user]["status"] == "admitted"
    await mine.stop()  # the stream goes away: presence lapses
    await staff.wait_for(about(user, "participant_left"), 4 * hb + grace + 5, "left")
    await staff.stop()
