"""MediaService SFU end to end: real aiortc peers on loopback through `classmesh up` and the
SDK's MediaSession: decode on 3 subscribers, keyframe on a late
join (PLI), audio-only, moderator mute, removal closes the peer, non-admitted users denied."""

from __future__ import annotations

import asyncio
import base64
import fractions
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiortc import AudioStreamTrack, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from google.rpc import error_details_pb2  # type: ignore[import-untyped]

from classmesh_sdk import (
    AccessToken,
    ClassMeshClient,
    InvalidArgumentError,
    MediaSession,
    PermissionDeniedError,
)
from classmesh_sdk._errors import from_rpc_error
from tests.support.classroom import (
    Mesh,
    add_student,
    classroom_mesh,
    join,
    live_class,
    open_breakout_room,
    uid,
)
from tests.support.media import LOOPBACK, Pattern, publisher, subscriber, video_frame
from tests.support.media import remote as remote_tracks

TURN_SECRET = "coturn-static-auth-secret"
TURN_URLS = "stun:turn.test:3478,turn:turn.test:3478?transport=udp"


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with classroom_mesh(
        admin_database_url,
        redis_url,
        tmp_path_factory,
        "media",
        extra_env={
            "CLASSMESH_MEDIA_ICE_HOSTS": "127.0.0.1",
            "CLASSMESH_TURN_URLS": TURN_URLS,
            "CLASSMESH_TURN_SECRET": TURN_SECRET,
            "CLASSMESH_TURN_TTL_SECONDS": "600",
        },
    ) as m:
        yield m


async def _publisher(mesh: Mesh, klass: Any) -> tuple[MediaSession, list[Any]]:
    return await publisher(klass.inst, klass.id)


async def _subscriber(
    client: Any, sid: str, audio_only: bool = False
) -> tuple[MediaSession, dict[str, Any]]:
    return await subscriber(client, sid, audio_only)


async def test_three_subscribers_decode_and_late_joiner_gets_keyframe(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=4)
    users = list(klass.students)
    pub, published = await _publisher(mesh, klass)
    subs: list[MediaSession] = []
    try:
        start = time.monotonic()
        remotes = []
        for user in users[:3]:
            sub, remote = await _subscriber(klass.students[user], klass.id)
            subs.append(sub)
            remotes.append(remote)
        for remote in remotes:
            frame = await video_frame(remote["video"], 5)
            assert (frame.width, frame.height) == (640, 360)
            audio = await asyncio.wait_for(remote["audio"].recv(), 5)
            assert audio.sample_rate == 48000 and audio.samples > 0
        assert time.monotonic() - start < 5 + 10  # generous: setup of 3 peers included
        # aiortc's encoder sends keyframes only every ~100 s: a late subscriber can only
        # decode within 2 s if its join made the SFU ask the publisher (PLI).
        await asyncio.sleep(10)
        joined = time.monotonic()
        late, remote = await _subscriber(klass.students[users[3]], klass.id)
        subs.append(late)
        frame = await video_frame(remote["video"], 2)
        assert (frame.width, frame.height) == (640, 360)
        # From the start of its media session (signaling, ICE, DTLS included) to a decoded
        # keyframe: the 2 s (measured on loopback: about 0.1 s).
        assert time.monotonic() - joined < 2.0, time.monotonic() - joined
        # The log got the track events.
        async with mesh.pool.acquire() as conn:
            types = await conn.fetch(
                "SELECT type FROM session_events WHERE session_id = $1 AND type LIKE 'track_%'",
                uuid.UUID(klass.id),
            )
        assert [r["type"] for r in types].count("track_published") == len(published)
    finally:
        for s in subs:
            await s.close()
        await pub.close()


async def _no_video(track: Any, seconds: float) -> None:
    with pytest.raises((TimeoutError, MediaStreamError)):
        await asyncio.wait_for(track.recv(), seconds)


async def test_audio_only_consumer_and_moderator_mute(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=2)
    a, b = list(klass.students)
    pub, _ = await _publisher(mesh, klass)
    subs: list[MediaSession] = []
    try:
        audio_only, remote_ao = await _subscriber(klass.students[a], klass.id, audio_only=True)
        subs.append(audio_only)
        normal, remote = await _subscriber(klass.students[b], klass.id)
        subs.append(normal)
        await video_frame(remote["video"], 5)
        await asyncio.wait_for(remote_ao["audio"].recv(), 5)
        await _no_video(remote_ao["video"], 2)
        # An admin (moderator) mutes the publisher's camera.
        admin = mesh.client(f"admin-{uuid.uuid4().hex[:6]}", "admin")
        await admin.sessions.mute_participant(
            session_id=klass.id, user_id=klass.teacher, video=True
        )
        await asyncio.sleep(0.5)
        # Drain what was queued before the mute, then nothing more arrives.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(remote["video"].recv(), 1.0)
            except TimeoutError:
                break
        else:
            pytest.fail("video still forwarded after the moderator muted it")
        await _no_video(remote["video"], 1.5)
        # Audio is still forwarded.
        await asyncio.wait_for(remote["audio"].recv(), 3)
    finally:
        for s in subs:
            await s.close()
        await pub.close()


async def test_removed_participant_peer_closes_within_1s(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    (user,) = list(klass.students)
    pub, _ = await _publisher(mesh, klass)
    sub, remote = await _subscriber(klass.students[user], klass.id)
    try:
        await video_frame(remote["video"], 5)
        await klass.inst.sessions.remove_participant(session_id=klass.id, user_id=user)
        # The bound: the removed participant's peer is closed within 1 s.
        await asyncio.wait_for(sub.ended.wait(), 1.0)
        assert sub.error is not None and sub.error.code().name == "PERMISSION_DENIED"
        assert from_rpc_error(sub.error).reason == "PARTICIPANT_REMOVED"
    finally:
        await sub.close()
        await pub.close()


async def test_non_admitted_cannot_signal(mesh: Mesh) -> None:
    klass = await live_class(mesh)
    stranger = mesh.client(f"stranger-{uuid.uuid4().hex[:6]}", "student")
    media = MediaSession(stranger, klass.id, ice_hosts=LOOPBACK)
    try:
        with pytest.raises((ConnectionError, PermissionDeniedError)):
            await media.start()
        await asyncio.wait_for(media.ended.wait(), 5)
        assert media.error is not None and media.error.code().name == "PERMISSION_DENIED"
    finally:
        await media.close()
    # The unary twin says the same.
    with pytest.raises(PermissionDeniedError):
        await stranger.media.send_signal(
            request_id="r1",
            signal={"signal_id": "s1", "session_id": klass.id, "leave": {}},
        )
    _ = add_student, fractions


def _reason(status: Any) -> str:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


async def _student_with_caps(mesh: Mesh, klass: Any, caps: list[str]) -> ClassMeshClient:
    user = uid("capped")
    token = (
        AccessToken(mesh.key_id, mesh.secret)
        .with_tenant(mesh.tenant_id)
        .with_identity(user, user)
        .with_grants(session="*", role="student", caps=caps)
        .to_jwt()
    )
    client = ClassMeshClient(mesh.target, token=token)
    mesh._clients.append(client)
    await join(client, klass.id)
    return client


async def test_publish_and_subscribe_need_their_capabilities(mesh: Mesh) -> None:
    klass = await live_class(mesh)
    pub, published = await _publisher(mesh, klass)
    try:
        no_publish = await _student_with_caps(mesh, klass, ["subscribe", "chat"])
        no_subscribe = await _student_with_caps(mesh, klass, ["publish", "chat"])
        # Unary twin: the reply is an error signal PERMISSION_DENIED / PERMISSION_MISSING.
        for client, message in (
            (no_publish, {"publish": {"client_track_id": "t1", "kind": "TRACK_KIND_AUDIO"}}),
            (no_publish, {"offer": {"type": "SDP_TYPE_OFFER", "sdp": "v=0"}}),
            (no_subscribe, {"subscribe": {"track_ids": [published[0].id]}}),
        ):
            resp = await client.media.send_signal(
                request_id=uid("r"),
                signal={"signal_id": "s1", "session_id": klass.id, **message},
            )
            assert resp.reply.WhichOneof("message") == "error", message
            assert resp.reply.error.code == 7, resp.reply.error  # PERMISSION_DENIED
            assert _reason(resp.reply.error) == "PERMISSION_MISSING"
        # On the Signal stream: the same error signal, and nothing was published/consumed.
        media = MediaSession(no_publish, klass.id, ice_hosts=LOOPBACK)
        try:
            await media.start()
            with pytest.raises(RuntimeError, match="PERMISSION_MISSING|code: 7"):
                await media.publish(AudioStreamTrack())
        finally:
            await media.close()
        assert not any(s.WhichOneof("message") == "track_published" for s in pub.signals)
        # With the capability the same subscribe works.
        sub, remote = await _subscriber(no_publish, klass.id)
        await sub.close()
        assert set(remote) == {"audio", "video"}
    finally:
        await pub.close()


async def test_routers_tracks_capabilities_stats_and_turn(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=2)
    a, b = list(klass.students)
    pub, published = await _publisher(mesh, klass)
    sub, remote = await _subscriber(klass.students[a], klass.id)
    try:
        await video_frame(remote["video"], 5)
        await asyncio.wait_for(remote["audio"].recv(), 5)
        inst = klass.inst.media
        # ListRouters: the one main-room router with its live counts.
        routers = await inst.list_routers(session_id=klass.id)
        assert routers.total_size == 1 and len(routers.routers) == 1
        router = routers.routers[0]
        assert router.breakout_room_id == "" and router.status == 1  # OPEN
        assert (router.participant_count, router.producer_count, router.consumer_count) == (
            2,
            2,
            2,
        )
        # ListTracks: publish order, paged.
        tracks = await inst.list_tracks(session_id=klass.id)
        assert [t.id for t in tracks.tracks] == [t.id for t in published]
        first = await inst.list_tracks(session_id=klass.id, page_size=1)
        assert [t.id for t in first.tracks] == [published[0].id] and first.next_page_token
        second = await inst.list_tracks(
            session_id=klass.id, page_size=1, page_token=first.next_page_token
        )
        assert [t.id for t in second.tracks] == [published[1].id]
        assert not second.next_page_token
        # Capabilities: Opus, VP8, H.264 (passthrough never transcodes), aiortc's extensions.
        caps = await klass.students[b].media.get_router_capabilities(session_id=klass.id)
        assert caps.router_id == router.id
        assert [(c.mime_type, c.clock_rate) for c in caps.capabilities.codecs] == [
            ("audio/opus", 48000),
            ("video/VP8", 90000),
            ("video/H264", 90000),
            ("video/H264", 90000),
        ]
        assert {c.parameters["profile-level-id"] for c in caps.capabilities.codecs[2:]} == {
            "42001f",
            "42e01f",
        }
        assert "nack pli" in caps.capabilities.codecs[1].rtcp_feedback
        uris = {e.uri for e in caps.capabilities.header_extensions}
        assert "urn:ietf:params:rtp-hdrext:sdes:mid" in uris
        assert not caps.capabilities.simulcast
        # Stats from the engine's counters.
        await asyncio.sleep(1)
        stats = (await inst.get_media_stats(session_id=klass.id)).routers
        assert len(stats) == 1 and stats[0].router_id == router.id
        r = stats[0]
        assert (r.producer_count, r.consumer_count) == (2, 2)
        assert r.received_frames > 30 and r.forwarded_frames > 30
        assert r.forwarded_bytes > r.forwarded_frames
        by_user = {p.user_id: p for p in r.participants}
        assert set(by_user) == {klass.teacher, a}
        assert by_user[klass.teacher].producer_count == 2
        assert by_user[klass.teacher].received_frames == r.received_frames
        assert by_user[a].consumer_count == 2
        assert by_user[a].forwarded_frames == r.forwarded_frames
        # A student sees only their own stats and may not ask for others'.
        own = (await klass.students[a].media.get_media_stats(session_id=klass.id)).routers
        assert [p.user_id for p in own[0].participants] == [a]
        with pytest.raises(PermissionDeniedError):
            await klass.students[a].media.get_media_stats(
                session_id=klass.id, user_id=klass.teacher
            )
        # TURN REST credentials (coturn use-auth-secret).
        before = int(time.time())
        turn = await klass.students[b].media.get_turn_credentials(session_id=klass.id)
        expiry, user = turn.username.split(":", 1)
        assert user == b and before + 600 <= int(expiry) <= int(time.time()) + 600
        digest = hmac.new(TURN_SECRET.encode(), turn.username.encode(), hashlib.sha1).digest()
        assert turn.credential == base64.b64encode(digest).decode()
        assert turn.ttl.seconds == 600 and turn.expire_time.seconds == int(expiry)
        assert list(turn.urls) == TURN_URLS.split(",")
        assert [(list(s.urls), s.username) for s in turn.ice_servers] == [
            (["stun:turn.test:3478"], ""),
            (["turn:turn.test:3478?transport=udp"], turn.username),
        ]
        short = await klass.students[b].media.get_turn_credentials(
            session_id=klass.id, ttl={"seconds": 120}
        )
        assert short.ttl.seconds == 120
        with pytest.raises(InvalidArgumentError):
            await klass.students[b].media.get_turn_credentials(
                session_id=klass.id, ttl={"seconds": 5}
            )
    finally:
        await sub.close()
        await pub.close()


async def _frames_flow(track: Any, count: int = 5, timeout: float = 5) -> None:
    for _ in range(count):
        await video_frame(track, timeout)


async def _stops(track: Any) -> None:
    """Nothing more arrives on `track` (ended, or silent after draining what was queued)."""
    with pytest.raises((TimeoutError, MediaStreamError)):
        for _ in range(200):
            await asyncio.wait_for(track.recv(), 1.5)


async def test_breakout_isolation(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=3)
    a, b, c = list(klass.students)
    room_a = await open_breakout_room(mesh, klass.id, [a, b])
    room_b = await open_breakout_room(mesh, klass.id, [c])
    pub_b = MediaSession(klass.students[c], klass.id, breakout_room_id=room_b, ice_hosts=LOOPBACK)
    pub_a = MediaSession(klass.students[b], klass.id, breakout_room_id=room_a, ice_hosts=LOOPBACK)
    sub = MediaSession(klass.students[a], klass.id, breakout_room_id=room_a, ice_hosts=LOOPBACK)
    try:
        await pub_b.start()
        in_b = await pub_b.publish(Pattern(), AudioStreamTrack())
        await pub_a.start()
        in_a = await pub_a.publish(Pattern(), AudioStreamTrack())
        await sub.start()
        tracks = await sub.wait_tracks(2)
        assert {t.id for t in tracks} == {t.id for t in in_a}
        assert {t.breakout_room_id for t in tracks} == {room_a}
        # Room B's track ids do not exist in room A's router.
        with pytest.raises(RuntimeError, match="TRACK_NOT_FOUND"):
            await sub.subscribe([in_b[0].id])
        await sub.subscribe([t.id for t in tracks])
        remote = await remote_tracks(sub, 2)
        await _frames_flow(remote["video"])
        await asyncio.sleep(1)
        # Nothing of room B ever reached the room A subscriber.
        assert sub.remote_tracks.empty()
        assert not set(sub.tracks) & {t.id for t in in_b}
        stats = (await klass.inst.media.get_media_stats(session_id=klass.id)).routers
        by_room = {r.breakout_room_id: r for r in stats}
        assert by_room[room_b].forwarded_frames == 0 and by_room[room_b].received_frames > 0
        assert by_room[room_a].forwarded_frames > 0
        assert {p.user_id for p in by_room[room_b].participants} == {c}
    finally:
        for m in (sub, pub_a, pub_b):
            await m.close()


async def test_move_main_breakout_main(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=2)
    a, b = list(klass.students)
    room = await open_breakout_room(mesh, klass.id, [a, b])
    main_pub, main_tracks = await _publisher(mesh, klass)
    room_pub = MediaSession(klass.students[b], klass.id, breakout_room_id=room, ice_hosts=LOOPBACK)
    try:
        await room_pub.start()
        room_tracks = await room_pub.publish(Pattern(), AudioStreamTrack())
        sub, remote = await _subscriber(klass.students[a], klass.id)
        await _frames_flow(remote["video"])
        inst = klass.inst.media
        # main -> breakout: old media stops, the room's media flows, within the 3 s target.
        t0 = time.monotonic()
        moved = await inst.move_participant(
            request_id=uid("mv"), session_id=klass.id, user_id=a, to_breakout_room_id=room
        )
        assert moved.to_router.breakout_room_id == room and moved.from_router_id
        await sub.wait_moved(1)
        assert sub.breakout_room_id == room
        tracks = await sub.wait_tracks(2)
        assert {t.id for t in tracks} == {t.id for t in room_tracks}
        await sub.subscribe([t.id for t in tracks])
        new_remote = await remote_tracks(sub, 2)
        await video_frame(new_remote["video"], 3)
        to_room = time.monotonic() - t0
        assert to_room < 3.0, f"move took {to_room:.2f} s"
        await _stops(remote["video"])
        await _frames_flow(new_remote["video"])
        stats = (await inst.get_media_stats(session_id=klass.id)).routers
        by_room = {r.breakout_room_id: r for r in stats}
        assert a not in {p.user_id for p in by_room[""].participants}
        assert {p.user_id: p.consumer_count for p in by_room[room].participants}[a] == 2
        # breakout -> main: the main room's media flows again, the room's stops.
        await inst.move_participant(request_id=uid("mv"), session_id=klass.id, user_id=a)
        await sub.wait_moved(2)
        assert sub.breakout_room_id == ""
        tracks = await sub.wait_tracks(2)
        assert {t.id for t in tracks} == {t.id for t in main_tracks}
        await sub.subscribe([t.id for t in tracks])
        back = await remote_tracks(sub, 2)
        await _frames_flow(back["video"])
        await _stops(new_remote["video"])
        # A publisher moves too: its tracks are re-published in the new room (new ids).
        await inst.move_participant(request_id=uid("mv"), session_id=klass.id, user_id=b)
        await room_pub.wait_moved(1)
        listed = (await inst.list_tracks(session_id=klass.id)).tracks
        moved_ids = [t.id for t in listed if t.user_id == b]
        assert len(moved_ids) == 2 and not set(moved_ids) & {t.id for t in room_tracks}
        assert not (await inst.list_tracks(session_id=klass.id, breakout_room_id=room)).tracks
        await sub.wait_tracks(4)
        await sub.subscribe(moved_ids)
        from_b = await remote_tracks(sub, 2)
        await _frames_flow(from_b["video"])
        await sub.close()
    finally:
        await room_pub.close()
        await main_pub.close()


async def test_h264_passthrough(mesh: Mesh) -> None:
    """H.264 is forwarded as it arrives (never decoded; a new consumer starts on a keyframe
    found by NAL type) and subscribers are offered exactly the publisher's codec."""
    klass = await live_class(mesh, students=3)
    a, b, c = list(klass.students)
    pub = MediaSession(klass.inst, klass.id, ice_hosts=LOOPBACK)
    subs: list[MediaSession] = []
    try:
        await pub.start()
        published = await pub.publish(Pattern(), AudioStreamTrack(), video_codec="video/H264")
        assert {t.mime_type for t in published} == {"video/H264", "audio/opus"}
        sub, remote = await _subscriber(klass.students[a], klass.id)
        subs.append(sub)
        for _ in range(5):
            frame = await video_frame(remote["video"], 5)
            assert (frame.width, frame.height) == (640, 360)
        offer = next(s.offer.sdp for s in sub.signals if s.WhichOneof("message") == "offer")
        video = offer[offer.index("m=video") :]
        assert "H264/90000" in video and "VP8/90000" not in video
        await asyncio.sleep(1)
        late, late_remote = await _subscriber(klass.students[b], klass.id)
        subs.append(late)
        t0 = time.monotonic()
        frame = await video_frame(late_remote["video"], 2)
        assert (frame.width, frame.height) == (640, 360) and time.monotonic() - t0 < 2.0
        stats = (await klass.inst.media.get_media_stats(session_id=klass.id)).routers
        assert stats[0].forwarded_frames > 0
        # A publisher that offers only H.264 without asking for a codec gets H.264.
        h264_only = MediaSession(klass.students[c], klass.id, ice_hosts=LOOPBACK)
        subs.append(h264_only)
        await h264_only.start()
        camera = Pattern()
        accepted = await h264_only.request(
            publish={"client_track_id": camera.id, "kind": "TRACK_KIND_VIDEO"}
        )
        assert accepted.publish_accepted.track.mime_type == "video/VP8"  # before the offer
        h264_only.pub_pc.addTrack(camera)
        (transceiver,) = h264_only.pub_pc.getTransceivers()
        transceiver.setCodecPreferences(
            [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/H264"]
        )
        await h264_only.pub_pc.setLocalDescription(await h264_only.pub_pc.createOffer())
        answer = await h264_only.request(
            offer={
                "type": "SDP_TYPE_OFFER",
                "sdp": h264_only.pub_pc.localDescription.sdp,
                "target": "PEER_CONNECTION_TARGET_PUBLISHER",
            }
        )
        assert "H264/90000" in answer.answer.sdp and "VP8/90000" not in answer.answer.sdp
        listed = (await klass.inst.media.list_tracks(session_id=klass.id)).tracks
        mine = next(t for t in listed if t.id == accepted.publish_accepted.track.id)
        assert mine.mime_type == "video/H264"
        await h264_only.pub_pc.setRemoteDescription(
            RTCSessionDescription(sdp=answer.answer.sdp, type="answer")
        )
        await sub.wait_tracks(3)
        await sub.subscribe([mine.id])
        third = await sub.next_remote_track(timeout=10)
        frame = await video_frame(third, 5)
        assert (frame.width, frame.height) == (640, 360)
        # A codec the back-end cannot forward is refused with the reason and what it can.
        resp = await klass.inst.media.send_signal(
            request_id=uid("r"),
            signal={
                "signal_id": "vp9",
                "session_id": klass.id,
                "publish": {
                    "client_track_id": "t9",
                    "kind": "TRACK_KIND_VIDEO",
                    "preferred_codec": "video/VP9",
                },
            },
        )
        assert resp.reply.error.code == 3 and _reason(resp.reply.error) == "CODEC_NOT_SUPPORTED"
        assert "video/VP8, video/H264" in resp.reply.error.message
    finally:
        for s in subs:
            await s.close()
        await pub.close()
