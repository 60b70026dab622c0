"""Media worker processes end to end: forwarding runs in worker processes, not in
the signaling process; routers go to the least-loaded worker; closing a session frees every
peer and transport in the worker; a SIGKILLed worker is replaced, its routers re-created and
clients renegotiate (MediaRestarted) until media flows again; workers die with their parent
(SIGTERM and SIGKILL); per worker and per participant figures in GetMediaStats; video
paused above the configured room size."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiortc.mediastreams import MediaStreamError

from classmesh.media.v1 import media_pb2 as M
from classmesh_sdk import MediaSession
from tests.conftest import create_database, drop_database
from tests.support.classroom import (
    Mesh,
    classroom_mesh,
    live_class,
    mesh_env,
    open_breakout_room,
    uid,
)
from tests.support.media import (
    LOOPBACK,
    alive,
    media_workers_of,
    parent_of,
    publisher,
    remote,
    subscriber,
    udp_sockets,
    video_frame,
)
from tests.support.mesh import start_mesh

WORKERS = 2


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with classroom_mesh(
        admin_database_url,
        redis_url,
        tmp_path_factory,
        "media_workers",
        extra_env={
            "CLASSMESH_MEDIA_ICE_HOSTS": "127.0.0.1",
            "CLASSMESH_MEDIA_WORKERS": str(WORKERS),
        },
    ) as m:
        yield m


async def _workers(mesh: Mesh, session_id: str) -> list[M.WorkerStats]:
    admin = mesh.client("media-admin", "admin")
    return list((await admin.media.get_media_stats(session_id=session_id)).workers)


async def _router(klass: Any) -> M.Router:
    routers = (await klass.inst.media.list_routers(session_id=klass.id)).routers
    assert len(routers) == 1
    return routers[0]


async def _until(check: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.2)


async def _frames(track: Any, count: int = 5, timeout: float = 5.0) -> None:
    for _ in range(count):
        await video_frame(track, timeout)


async def test_forwarding_runs_in_workers_placed_by_load_and_freed_on_close(mesh: Mesh) -> None:
    mesh_pid = mesh.proc.proc.pid
    first = await live_class(mesh, students=1)
    workers = await _workers(mesh, first.id)
    # N worker processes, children of the signaling process, running the worker module.
    assert len(workers) == WORKERS and all(w.alive for w in workers)
    pids = {w.worker_id: w.pid for w in workers}
    assert sorted(pids.values()) == media_workers_of(mesh_pid)
    assert all(parent_of(pid) == mesh_pid for pid in pids.values())
    # Two busy classes: each router goes to the least-loaded worker, so they do not share.
    second = await live_class(mesh, students=1)
    sessions = []
    for klass in (first, second):
        (student,) = klass.students.values()
        pub, _ = await publisher(klass.inst, klass.id)
        sub, tracks = await subscriber(student, klass.id)
        await _frames(tracks["video"])
        sessions.append((klass, pub, sub))
    nodes = [(await _router(k)).node_id for k, _, _ in sessions]
    assert sorted(nodes) == sorted(pids), nodes
    # Media runs in the workers: their UDP sockets carry ICE; the signaling process has none.
    assert udp_sockets(mesh_pid) == 0
    for node in nodes:
        # The publisher's and the subscriber's negotiated connections (the two unused ones
        # never gather).
        assert udp_sockets(pids[node]) >= 2
    by_id = {w.worker_id: w for w in await _workers(mesh, first.id)}
    for node in nodes:
        w = by_id[node]
        assert (w.router_count, w.peer_count, w.producer_count, w.consumer_count) == (1, 2, 2, 2)
        assert w.connection_count == 4
        assert w.forwarded_frames > 0 and w.forwarded_bytes > w.forwarded_frames
        assert w.received_frames > 0 and w.backend == M.MEDIA_BACKEND_AIORTC
    # Ending the sessions closes their routers and frees every peer and transport.
    for klass, pub, sub in sessions:
        await klass.inst.sessions.end_session(session_id=klass.id)
        await sub.close()
        await pub.close()

    async def freed() -> bool:
        ws = await _workers(mesh, first.id)
        return all(
            (w.router_count, w.peer_count, w.producer_count, w.consumer_count) == (0, 0, 0, 0)
            and w.connection_count == 0
            for w in ws
        ) and all(udp_sockets(pid) == 0 for pid in pids.values())

    await _until(freed, 10, "workers free of routers, peers and sockets")
    routers = (
        await first.inst.media.list_routers(session_id=first.id, include_closed=True)
    ).routers
    assert [r.status for r in routers] == [M.ROUTER_STATUS_CLOSED]


async def test_killed_worker_is_replaced_and_media_flows_again(mesh: Mesh) -> None:
    mesh_pid = mesh.proc.proc.pid
    klass = await live_class(mesh, students=1)
    (student,) = klass.students.values()
    pub, published = await publisher(klass.inst, klass.id)
    sub, tracks = await subscriber(student, klass.id)
    try:
        await _frames(tracks["video"])
        router = await _router(klass)
        before = {w.worker_id: w for w in await _workers(mesh, klass.id)}
        victim = before[router.node_id].pid
        os.kill(victim, signal.SIGKILL)
        # Both clients are told to renegotiate and do (SDK): new connections, same track ids.
        await sub.wait_restarted(1, timeout=15)
        await pub.wait_restarted(1, timeout=15)
        restarted = [s for s in sub.signals if s.WhichOneof("message") == "media_restarted"]
        assert [s.media_restarted.router_id for s in restarted] == [router.id]
        # The subscriber decodes new frames from the new connection.
        fresh = await remote(sub, 2, timeout=10)
        frame = await video_frame(fresh["video"], 10)
        assert (frame.width, frame.height) == (640, 360)
        await _frames(fresh["video"])
        await asyncio.wait_for(fresh["audio"].recv(), 5)
        # The old remote track ended with the old connection.
        with pytest.raises((MediaStreamError, TimeoutError)):
            for _ in range(200):
                await asyncio.wait_for(tracks["video"].recv(), 1.5)
        # The router kept its id and tracks; the slot has a new process.
        again = await _router(klass)
        assert again.id == router.id and again.producer_count == 2
        listed = (await klass.inst.media.list_tracks(session_id=klass.id)).tracks
        assert [t.id for t in listed] == [t.id for t in published]
        after = {w.worker_id: w for w in await _workers(mesh, klass.id)}
        assert not alive(victim)
        respawned = after[router.node_id]  # the slot keeps its id, with a new process
        assert respawned.alive and respawned.pid != victim and respawned.restarts == 1
        assert sorted(w.pid for w in after.values()) == media_workers_of(mesh_pid)
        # Nothing leaks: exactly this session's peers live where the router now runs.
        host = after[again.node_id]
        assert (host.router_count, host.peer_count, host.producer_count) == (1, 2, 2)
        assert host.consumer_count == 2 and host.connection_count == 4
    finally:
        await sub.close()
        await pub.close()
    await klass.inst.sessions.end_session(session_id=klass.id)

    async def freed() -> bool:
        ws = await _workers(mesh, klass.id)
        return all(w.peer_count == 0 and w.connection_count == 0 for w in ws)

    await _until(freed, 10, "workers free after the session ended")


async def test_participant_figures_from_aiortc_stats(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    (student_id,) = klass.students
    pub, _ = await publisher(klass.inst, klass.id)
    sub, tracks = await subscriber(klass.students[student_id], klass.id)
    try:
        await _frames(tracks["video"], 30)
        # aiortc's RTCP (sender reports, receiver reports) needs a few seconds for RTT.

        async def sampled() -> bool:
            stats = (await klass.inst.media.get_media_stats(session_id=klass.id)).routers
            rows = {p.user_id: p for p in stats[0].participants}
            return (
                rows[student_id].round_trip_time.ToNanoseconds() > 0
                and rows[klass.teacher].send_bitrate_bps > 0
            )

        await _until(sampled, 15, "RTT and bitrates sampled")
        (stats,) = (await klass.inst.media.get_media_stats(session_id=klass.id)).routers
        rows = {p.user_id: p for p in stats.participants}
        teacher, student = rows[klass.teacher], rows[student_id]
        # The publisher sends 640x360@30 VP8 + Opus: tens of kbit/s to a few Mbit/s.
        assert 30_000 < teacher.send_bitrate_bps < 10_000_000, teacher
        assert 30_000 < student.receive_bitrate_bps < 10_000_000, student
        assert stats.ingress_bitrate_bps >= teacher.send_bitrate_bps
        assert stats.egress_bitrate_bps >= student.receive_bitrate_bps
        # Loopback: RTT under 200 ms, jitter under 100 ms, (almost) no loss.
        rtt = student.round_trip_time.ToNanoseconds() / 1e9
        assert 0 < rtt < 0.2, rtt
        for row in (teacher, student):
            jitter = row.jitter.ToNanoseconds() / 1e9
            assert 0 <= jitter < 0.1, row
            assert 0.0 <= row.packet_loss_ratio <= 0.05 and row.packets_lost >= 0
        assert teacher.jitter.ToNanoseconds() > 0  # measured on the published streams
        assert student.quality in (M.CONNECTION_QUALITY_EXCELLENT, M.CONNECTION_QUALITY_GOOD)
    finally:
        await sub.close()
        await pub.close()


async def test_set_preferred_layers_names_the_janus_backend(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    (student,) = klass.students.values()
    pub, published = await publisher(klass.inst, klass.id)
    sub, _ = await subscriber(student, klass.id)
    try:
        video = next(t for t in published if t.kind == M.TRACK_KIND_VIDEO)
        with pytest.raises(RuntimeError, match="LAYERS_NOT_SUPPORTED") as err:
            await sub.request(
                set_preferred_layers=M.SetPreferredLayers(
                    track_id=video.id, spatial_layer=0, temporal_layer=0
                )
            )
        assert "janus" in str(err.value) and "code: 9" in str(err.value)  # FAILED_PRECONDITION
        caps = await student.media.get_router_capabilities(session_id=klass.id)
        assert not caps.capabilities.simulcast
    finally:
        await sub.close()
        await pub.close()


async def test_move_across_workers_republishes(mesh: Mesh) -> None:
    """A publisher moved to a room whose router runs on another worker cannot keep its
    publisher connection: RouterMoved says republish, the SDK publishes again, and the
    room's subscriber decodes the moved tracks."""
    klass = await live_class(mesh, students=2)
    a, b = list(klass.students)
    room = await open_breakout_room(mesh, klass.id, [a, b])
    teacher, _ = await publisher(klass.inst, klass.id)
    mover, _ = await publisher(klass.students[b], klass.id)  # main room: 2 peers there
    sub = MediaSession(klass.students[a], klass.id, breakout_room_id=room, ice_hosts=LOOPBACK)
    try:
        await sub.start()
        routers = {
            r.breakout_room_id: r
            for r in (await klass.inst.media.list_routers(session_id=klass.id)).routers
        }
        assert routers[""].node_id != routers[room].node_id  # the least-loaded worker
        await klass.inst.media.move_participant(
            request_id=uid("mv"), session_id=klass.id, user_id=b, to_breakout_room_id=room
        )
        await mover.wait_moved(1)
        (moved,) = [s.router_moved for s in mover.signals if s.HasField("router_moved")]
        assert moved.republish and moved.to_router_id == routers[room].id
        tracks = await sub.wait_tracks(2)
        assert {t.user_id for t in tracks} == {b}
        await sub.subscribe([t.id for t in tracks])
        got = await remote(sub, 2)
        await _frames(got["video"])
        await asyncio.wait_for(got["audio"].recv(), 5)
    finally:
        for media in (sub, mover, teacher):
            await media.close()
    await klass.inst.sessions.end_session(session_id=klass.id)


# ------------------------------------------------------------------------------ no orphans


@pytest.mark.parametrize(
    ("args", "how"),
    [(("up",), signal.SIGTERM), (("serve", "media"), signal.SIGKILL)],
)
async def test_workers_die_with_their_parent(
    admin_database_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    args: tuple[str, ...],
    how: signal.Signals,
) -> None:
    dsn = await create_database(admin_database_url)
    logdir = tmp_path_factory.mktemp("media_orphans")
    env = mesh_env(dsn, redis_url, logdir, {"CLASSMESH_MEDIA_WORKERS": "2"})
    proc = start_mesh(env, str(logdir / "stderr.log"), *args)
    try:
        proc.wait_ready()
        workers = media_workers_of(proc.proc.pid)
        assert len(workers) == 2, "workers start with the media service"
        proc.proc.send_signal(how)
        proc.proc.wait(timeout=15)
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not any(alive(pid) for pid in workers), f"orphaned workers after {how.name}"
    finally:
        proc.kill()
        await drop_database(admin_database_url, dsn)


# ------------------------------------------------------------------------------ room size


@pytest.fixture(scope="module")
async def small_rooms(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with classroom_mesh(
        admin_database_url,
        redis_url,
        tmp_path_factory,
        "media_room_size",
        extra_env={
            "CLASSMESH_MEDIA_ICE_HOSTS": "127.0.0.1",
            "CLASSMESH_MEDIA_WORKERS": "1",
            "CLASSMESH_MEDIA_AUDIO_ONLY_ABOVE": "2",
        },
    ) as m:
        yield m


def _pauses(media: MediaSession, track_id: str) -> list[str]:
    out = []
    for s in media.signals:
        kind = s.WhichOneof("message")
        if kind == "consumer_paused" and s.consumer_paused.track_id == track_id:
            out.append(f"paused:{M.PauseReason.Name(s.consumer_paused.reason)}")
        elif kind == "consumer_resumed" and s.consumer_resumed.track_id == track_id:
            out.append("resumed")
    return out


async def _silent(track: Any, seconds: float) -> None:
    """Drain what was queued, then nothing for `seconds`."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(track.recv(), seconds)
        except TimeoutError:
            return
    pytest.fail("video still forwarded")


async def test_video_paused_above_room_size_and_resumed_below(small_rooms: Mesh) -> None:
    klass = await live_class(small_rooms, students=2)
    a, b = list(klass.students)
    pub, published = await publisher(klass.inst, klass.id)
    video_id = next(t.id for t in published if t.kind == M.TRACK_KIND_VIDEO)
    first, tracks = await subscriber(klass.students[a], klass.id)
    second: MediaSession | None = None
    try:
        await _frames(tracks["video"])  # 2 participants: video flows
        assert _pauses(first, video_id) == []
        # A third participant: above 2, video stops for everyone, audio goes on.
        second, late = await subscriber(klass.students[b], klass.id)
        await _until(
            lambda: _async(_pauses(first, video_id) == ["paused:PAUSE_REASON_ROOM_SIZE"]),
            5,
            "ConsumerPaused ROOM_SIZE for the existing subscriber",
        )
        assert _pauses(second, video_id) == ["paused:PAUSE_REASON_ROOM_SIZE"]
        await _silent(tracks["video"], 2.0)
        await _silent(late["video"], 1.0)
        await asyncio.wait_for(tracks["audio"].recv(), 3)
        await asyncio.wait_for(late["audio"].recv(), 3)
        # Back to 2 participants: video resumes (after a keyframe) for the one left.
        await second.close()
        second = None
        await _until(
            lambda: _async(_pauses(first, video_id)[-1:] == ["resumed"]),
            5,
            "ConsumerResumed after the room shrank",
        )
        t0 = time.monotonic()
        frame = await video_frame(tracks["video"], 3)
        assert (frame.width, frame.height) == (640, 360) and time.monotonic() - t0 < 3
    finally:
        if second is not None:
            await second.close()
        await first.close()
        await pub.close()


async def _async(value: bool) -> bool:
    return value
