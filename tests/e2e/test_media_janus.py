"""MediaService on the Janus back-end end to end: `classmesh up` with
CLASSMESH_MEDIA_BACKEND=janus, Debian's Janus in a private network namespace, real aiortc
peers (the SDK's MediaSession) and Chromium as a simulcast publisher.

Why a namespace (tests/support/netns.py): Janus never gathers ICE candidates on loopback,
so it runs in a namespace of its own behind a veth pair; the mesh reaches its HTTP API over
the veth and the test's peers pin their ICE host candidates to the root end of the veth.
A machine that cannot create namespaces fails these tests with that reason (never skips).

aiortc cannot send simulcast, so Chromium (headless, fake camera) publishes three rid
encodings through ClassMesh's signaling; an aiortc subscriber picks layers with
SetPreferredLayers and sees the decoded frame size follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aioice.ice
import pytest
from aiortc import AudioStreamTrack, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from classmesh.core.errors import Unavailable
from classmesh.media.engine.backend import RouterRestarted
from classmesh.media.janus.backend import JanusBackend
from classmesh.media.janus.client import map_error
from classmesh.media.janus.sdp import media_sections
from classmesh.media.v1 import media_pb2
from classmesh_sdk import MediaSession
from tests.support.classroom import Mesh, classroom_mesh, live_class, open_breakout_room
from tests.support.janus import JanusServer, janus_in_netns
from tests.support.netns import private_netns

M = media_pb2
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts" / "janus"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


class Pattern(VideoStreamTrack):
    """Synthetic 640x360 video (a moving bar), encoded by aiortc's VP8 encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame(width=640, height=360, format="yuv420p")
        x = (self.n * 8) % 600
        frame.planes[0].update((bytes(x) + bytes([235]) * 40 + bytes(600 - x)) * 360)
        for plane in frame.planes[1:]:
            plane.update(bytes([128]) * (plane.line_size * plane.height))
        self.n += 1
        frame.pts, frame.time_base = pts, time_base
        return frame


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def janus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JanusServer]:
    # NetnsUnavailable propagates: every test here errors with the reason (no skip).
    gather = aioice.ice.get_host_addresses
    try:
        with janus_in_netns(tmp_path_factory.mktemp("janus")) as server:
            yield server
            shutil.copy(server.log_path, tmp_path_factory.getbasetemp() / "janus-last.log")
    finally:
        # Our peers pinned ICE to the veth, which is gone now: later tests gather as before.
        aioice.ice.get_host_addresses = gather


@pytest.fixture(scope="module")
async def mesh(
    janus: JanusServer,
    admin_database_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Mesh]:
    async with classroom_mesh(
        admin_database_url, redis_url, tmp_path_factory, "media-janus", extra_env=janus.env()
    ) as m:
        yield m


@contextlib.asynccontextmanager
async def artifacts_on_failure(
    name: str, janus: JanusServer, mesh: Mesh | None = None, driver: Any = None
) -> AsyncIterator[None]:
    """On failure keep what explains it in tests/artifacts/janus/<name>/ (git-ignored)."""
    try:
        yield
    except BaseException:
        out = ARTIFACTS / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "janus.log").write_text(janus.log_tail(400))
        if mesh is not None:
            (out / "mesh-stderr.log").write_text(mesh.proc.stderr_tail())
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.save_screenshot(str(out / "chromium.png"))
            with contextlib.suppress(Exception):
                (out / "chromium-console.json").write_text(
                    json.dumps(driver.get_log("browser"), indent=1)
                )
        raise


def _hosts(janus: JanusServer) -> list[str]:
    return [janus.netns.outside_ip]


async def _publisher(janus: JanusServer, client: Any, sid: str, room: str = "") -> MediaSession:
    pub = MediaSession(client, sid, breakout_room_id=room, ice_hosts=_hosts(janus))
    await pub.start()
    await pub.publish(Pattern(), AudioStreamTrack())
    return pub


async def _subscriber(
    janus: JanusServer, client: Any, sid: str, *, audio_only: bool = False, room: str = ""
) -> tuple[MediaSession, dict[str, Any]]:
    sub = MediaSession(client, sid, breakout_room_id=room, ice_hosts=_hosts(janus))
    await sub.start()
    tracks = await sub.wait_tracks(2)
    await sub.subscribe([t.id for t in tracks], audio_only=audio_only)
    remote: dict[str, Any] = {}
    for _ in range(2):
        track = await sub.next_remote_track(timeout=10)
        remote[track.kind] = track
    return sub, remote


async def _frame(track: Any, timeout: float) -> VideoFrame:
    frame = await asyncio.wait_for(track.recv(), timeout)
    assert isinstance(frame, VideoFrame)
    return frame


async def _silent(track: Any, drain: float = 3.0, quiet: float = 1.5) -> None:
    """Nothing more arrives on `track` after draining what was already on its way."""
    deadline = time.monotonic() + drain
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(track.recv(), 1.0)
        except (TimeoutError, MediaStreamError):
            break
    else:
        pytest.fail(f"{track.kind} still flows")
    with pytest.raises((TimeoutError, MediaStreamError)):
        await asyncio.wait_for(track.recv(), quiet)


# ----------------------------------------------------------------------------- tests


async def test_three_subscribers_decode_through_janus(janus: JanusServer, mesh: Mesh) -> None:
    klass = await live_class(mesh, students=4)
    users = list(klass.students)
    sessions: list[MediaSession] = []
    async with artifacts_on_failure("three-subscribers", janus, mesh):
        try:
            pub = await _publisher(janus, klass.inst, klass.id)
            sessions.append(pub)
            remotes = []
            for user in users[:3]:
                sub, remote = await _subscriber(janus, klass.students[user], klass.id)
                sessions.append(sub)
                remotes.append(remote)
            t0 = time.monotonic()
            for remote in remotes:
                frame = await _frame(remote["video"], 5)
                assert (frame.width, frame.height) == (640, 360)
                audio = await asyncio.wait_for(remote["audio"].recv(), 5)
                assert audio.sample_rate == 48000 and audio.samples > 0
            assert time.monotonic() - t0 < 5
            # A late subscriber decodes within 2 s: Janus asks the publisher for a keyframe
            # (aiortc's encoder alone sends one only every ~100 s).
            await asyncio.sleep(3)
            late, remote = await _subscriber(janus, klass.students[users[3]], klass.id)
            sessions.append(late)
            t1 = time.monotonic()
            frame = await _frame(remote["video"], 2.5)
            assert (frame.width, frame.height) == (640, 360)
            assert time.monotonic() - t1 < 2.5
            # The router is a Janus router, and its figures come from Janus's admin API.
            routers = (await klass.inst.media.list_routers(session_id=klass.id)).routers
            assert [r.backend for r in routers] == [M.MEDIA_BACKEND_JANUS]
            stats = (await klass.inst.media.get_media_stats(session_id=klass.id)).routers
            assert len(stats) == 1 and stats[0].router_id == routers[0].id
            assert (stats[0].producer_count, stats[0].consumer_count) == (2, 8)
            assert stats[0].forwarded_bytes > 10_000
            assert stats[0].ingress_bitrate_bps > 0 and stats[0].egress_bitrate_bps > 0
        finally:
            for s in sessions:
                await s.close()


async def test_moderator_mute_and_audio_only_through_janus(janus: JanusServer, mesh: Mesh) -> None:
    klass = await live_class(mesh, students=2)
    a, b = list(klass.students)
    sessions: list[MediaSession] = []
    async with artifacts_on_failure("mute", janus, mesh):
        try:
            sessions.append(await _publisher(janus, klass.inst, klass.id))
            audio_only, remote_ao = await _subscriber(
                janus, klass.students[a], klass.id, audio_only=True
            )
            sessions.append(audio_only)
            normal, remote = await _subscriber(janus, klass.students[b], klass.id)
            sessions.append(normal)
            await _frame(remote["video"], 5)
            await asyncio.wait_for(remote_ao["audio"].recv(), 5)
            with pytest.raises((TimeoutError, MediaStreamError)):
                await asyncio.wait_for(remote_ao["video"].recv(), 2)
            # A moderator mutes the instructor's camera: Janus stops relaying it.
            admin = mesh.client(f"admin-{uuid.uuid4().hex[:6]}", "admin")
            await admin.sessions.mute_participant(
                session_id=klass.id, user_id=klass.teacher, video=True
            )
            await asyncio.sleep(0.5)
            await _silent(remote["video"])
            await asyncio.wait_for(remote["audio"].recv(), 3)  # audio still flows
            await admin.sessions.unmute_participant(
                session_id=klass.id, user_id=klass.teacher, video=True
            )
            await _frame(remote["video"], 5)
        finally:
            for s in sessions:
                await s.close()


async def test_breakout_isolation_through_janus(janus: JanusServer, mesh: Mesh) -> None:
    klass = await live_class(mesh, students=3)
    a, b, c = list(klass.students)
    room_a = await open_breakout_room(mesh, klass.id, [a, b])
    room_b = await open_breakout_room(mesh, klass.id, [c])
    sessions: list[MediaSession] = []
    async with artifacts_on_failure("breakout", janus, mesh):
        try:
            pub_b = await _publisher(janus, klass.students[c], klass.id, room_b)
            sessions.append(pub_b)
            sessions.append(await _publisher(janus, klass.students[b], klass.id, room_a))
            sub, remote = await _subscriber(janus, klass.students[a], klass.id, room=room_a)
            sessions.append(sub)
            assert {t.breakout_room_id for t in sub.tracks.values()} == {room_a}
            await _frame(remote["video"], 5)
            await asyncio.sleep(1)
            assert sub.remote_tracks.empty()  # nothing of room B arrived
            in_b = {
                s.publish_accepted.track.id for s in pub_b.signals if s.publish_accepted.track.id
            }
            assert in_b and not in_b & set(sub.tracks)
            with pytest.raises(RuntimeError, match="TRACK_NOT_FOUND"):
                await sub.subscribe(sorted(in_b)[:1])
            routers = (await klass.inst.media.list_routers(session_id=klass.id)).routers
            # Main room (opened when the class started) and one router per breakout room.
            assert {r.breakout_room_id for r in routers} == {"", room_a, room_b}
            assert {r.backend for r in routers} == {M.MEDIA_BACKEND_JANUS}
        finally:
            for s in sessions:
                await s.close()


# ----------------------------------------------------------------------------- simulcast

PAGE = """<!doctype html><html><body><script>
window.pc = null;
window.publish = async function (width, height) {
  pc = new RTCPeerConnection({iceServers: []});
  const stream = await navigator.mediaDevices.getUserMedia(
    {video: {width: {exact: width}, height: {exact: height}}, audio: false});
  const track = stream.getVideoTracks()[0];
  pc.addTransceiver(track, {direction: 'sendonly', streams: [stream], sendEncodings: [
    {rid: 'h', maxBitrate: 1500000},
    {rid: 'm', scaleResolutionDownBy: 2, maxBitrate: 500000},
    {rid: 'l', scaleResolutionDownBy: 4, maxBitrate: 150000}]});
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(done => {
    if (pc.iceGatheringState === 'complete') return done();
    pc.addEventListener('icegatheringstatechange',
      () => pc.iceGatheringState === 'complete' && done());
  });
  return {sdp: pc.localDescription.sdp, trackId: track.id};
};
window.answer = async function (sdp) { await pc.setRemoteDescription({type: 'answer', sdp}); };
window.sending = async function () {
  const out = {};
  (await pc.getStats()).forEach(r => {
    if (r.type === 'outbound-rtp') out[r.rid] = [r.frameWidth || 0, r.frameHeight || 0];
  });
  return {state: pc.connectionState, layers: out};
};
</script></body></html>
"""

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Real host candidates (not mDNS names, which Janus is told to ignore).
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    # Chromium sends at most 2 simulcast layers at 640x360 unless this limit is off.
    "--force-fieldtrials=WebRTC-LegacySimulcastLayerLimit/Disabled/",
]


def _chromium(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def _js(driver: Any, call: str, *args: Any) -> Any:
    script = (
        "const done = arguments[arguments.length - 1];"
        f"{call}.then(done, e => done({{error: String(e)}}));"
    )
    result = driver.execute_async_script(script, *args)
    if isinstance(result, dict) and "error" in result:
        raise AssertionError(f"Chromium: {call}: {result['error']}")
    return result


async def _sizes(track: Any, seconds: float) -> dict[int, int]:
    """Decoded frame widths seen for `seconds` -> count."""
    seen: dict[int, int] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        frame = await _frame(track, 5)
        seen[frame.width] = seen.get(frame.width, 0) + 1
    return seen


async def _settles_on(track: Any, width: int, timeout: float = 20) -> None:
    """Within `timeout` the decoded frames are `width` wide for a whole second."""
    deadline = time.monotonic() + timeout
    last: dict[int, int] = {}
    while time.monotonic() < deadline:
        last = await _sizes(track, 1.0)
        if set(last) == {width}:
            return
    pytest.fail(f"decoded widths {last} did not settle on {width}")


async def test_simulcast_layer_preference_with_chromium_publisher(
    janus: JanusServer, mesh: Mesh, tmp_path: Path
) -> None:
    klass = await live_class(mesh, students=1)
    (student,) = list(klass.students)
    page = tmp_path / "publisher.html"
    page.write_text(PAGE)
    driver = await asyncio.to_thread(_chromium, tmp_path / "profile")
    sessions: list[MediaSession] = []
    async with artifacts_on_failure("simulcast", janus, mesh, driver):
        try:
            await asyncio.to_thread(driver.get, page.as_uri())
            offer = await asyncio.to_thread(_js, driver, "publish(640, 360)")
            assert "a=simulcast:send h;m;l" in offer["sdp"]
            # ClassMesh signaling for Chromium's connection: the SDK session only signals.
            signaling = MediaSession(klass.inst, klass.id, ice_hosts=_hosts(janus))
            sessions.append(signaling)
            await signaling.start()
            accepted = await signaling.request(
                publish=M.PublishTrack(
                    client_track_id=offer["trackId"],
                    kind=M.TRACK_KIND_VIDEO,
                    name="camera",
                    layers=[
                        M.VideoLayer(spatial_layer=0, rid="l", width=160, height=90),
                        M.VideoLayer(spatial_layer=1, rid="m", width=320, height=180),
                        M.VideoLayer(spatial_layer=2, rid="h", width=640, height=360),
                    ],
                )
            )
            track_id = accepted.publish_accepted.track.id
            reply = await signaling.request(
                offer=M.SessionDescription(
                    type=M.SDP_TYPE_OFFER,
                    sdp=offer["sdp"],
                    target=M.PEER_CONNECTION_TARGET_PUBLISHER,
                )
            )
            await asyncio.to_thread(_js, driver, "answer(arguments[0])", reply.answer.sdp)
            # Chromium sends all three encodings.
            deadline = time.monotonic() + 10
            while True:
                sending = await asyncio.to_thread(_js, driver, "sending()")
                widths = sorted(w for w, _ in sending["layers"].values())
                if sending["state"] == "connected" and widths == [160, 320, 640]:
                    break
                assert time.monotonic() < deadline, sending
                await asyncio.sleep(0.5)
            # An aiortc subscriber: full layer by default, then the low one, then back.
            sub = MediaSession(klass.students[student], klass.id, ice_hosts=_hosts(janus))
            sessions.append(sub)
            await sub.start()
            await sub.wait_tracks(1)
            # Layers left unset: the highest (SubscribeTracks' layers are optional).
            await sub.request(subscribe=M.SubscribeTracks(track_ids=[track_id]))
            video = await sub.next_remote_track(timeout=10)
            await _settles_on(video, 640)
            for spatial, width in ((0, 160), (1, 320), (2, 640)):
                await sub.request(
                    set_preferred_layers=M.SetPreferredLayers(
                        track_id=track_id, spatial_layer=spatial, temporal_layer=2
                    )
                )
                await _settles_on(video, width)
            caps = await klass.inst.media.get_router_capabilities(session_id=klass.id)
            assert caps.capabilities.simulcast
        finally:
            for s in sessions:
                await s.close()
            await asyncio.to_thread(driver.quit)


# ----------------------------------------------------------------------------- failures


async def test_janus_down_is_unavailable_media_unavailable(janus: JanusServer) -> None:
    # Nothing listens on port 1 of the namespace's address: refused at once.
    backend = JanusBackend(f"http://{janus.netns.inside_ip}:1/janus", timeout=3)
    await backend.start()  # does not raise: the service keeps running while Janus is down
    try:
        with pytest.raises(Unavailable) as caught:
            await backend.open_router(str(uuid.uuid4()))
        assert caught.value.reason == "MEDIA_UNAVAILABLE"
        assert "unreachable" in caught.value.message
    finally:
        await backend.close()


def test_no_namespaces_fails_with_the_reason() -> None:
    """Without CAP_NET_ADMIN (an unprivileged user namespace here) the harness raises
    NetnsUnavailable naming the missing capability, so the Janus tests fail, not skip."""
    if shutil.which("unshare") is None:
        pytest.fail("util-linux `unshare` is needed to check the no-CAP_NET_ADMIN path")
    probe = (
        "from tests.support.netns import private_netns, NetnsUnavailable\n"
        "try:\n"
        "    with private_netns():\n"
        "        print('CREATED')\n"
        "except NetnsUnavailable as exc:\n"
        "    print('UNAVAILABLE', exc)\n"
    )
    done = subprocess.run(
        ["unshare", "--user", sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("UNAVAILABLE"), done.stdout
    assert "CAP_NET_ADMIN" in done.stdout
    # And with the capability a namespace is created and removed again.
    with private_netns() as ns:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert ns.name in listed
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ns.name not in listed


async def test_janus_restart_reopens_its_routers(tmp_path: Path) -> None:
    """Janus crashes and comes back (it knows none of our rooms): the back-end opens a new
    session, re-creates every open room empty and tells the service (RouterRestarted)."""
    with janus_in_netns(tmp_path) as server:
        backend = JanusBackend(server.url, timeout=3)
        got: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()

        async def events(router_id: str, peer_id: str, event: Any) -> None:
            await got.put((router_id, peer_id, event))

        backend.events = events
        await backend.start()
        try:
            router = str(uuid.uuid4())
            await backend.open_router(router)
            await backend.add_peer(router, "p1")
            await asyncio.to_thread(server.restart)
            router_id, peer_id, event = await asyncio.wait_for(got.get(), 20)
            assert isinstance(event, RouterRestarted)
            assert (router_id, peer_id) == (router, "")
            assert backend.rooms[router].peers == {}
            exists = await backend.client.message(
                backend._control, {"request": "exists", "room": router}
            )
            assert exists.data["exists"] is True
        finally:
            await backend.close()


CHROME_OFFER = """v=0
o=- 1 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1
m=audio 9 UDP/TLS/RTP/SAVPF 111
a=mid:0
a=sendonly
a=msid:stream audio-track
m=video 9 UDP/TLS/RTP/SAVPF 96
a=mid:1
a=sendonly
a=msid:stream video-track
a=rid:h send
a=rid:m send
a=rid:l send
a=simulcast:send h;m;l
"""


def test_publisher_offer_sections_and_error_mapping() -> None:
    sections = media_sections(CHROME_OFFER)
    assert [(s.kind, s.mid, s.track_id, s.direction, s.rids) for s in sections] == [
        ("audio", "0", "audio-track", "sendonly", ()),
        ("video", "1", "video-track", "sendonly", ("h", "m", "l")),
    ]
    assert map_error(426, "No such room", what="r1").reason == "ROUTER_NOT_FOUND"
    assert map_error(428, "No such feed").reason == "TRACK_NOT_FOUND"
    assert map_error(465, "bad SDP").reason == "SDP_INVALID"
    assert isinstance(map_error(458, "No such session"), Unavailable)
    assert map_error(490, "something else").reason == "MEDIA_UNAVAILABLE"


async def test_moves_between_janus_rooms(janus: JanusServer, mesh: Mesh) -> None:
    """A subscriber moved main -> breakout gets the room's media; a publisher moved there
    publishes again (a Janus feed cannot change rooms: RouterMoved.republish) and the
    room's subscriber receives its new tracks."""
    klass = await live_class(mesh, students=2)
    a, b = list(klass.students)
    room = await open_breakout_room(mesh, klass.id, [a, b])
    sessions: list[MediaSession] = []
    async with artifacts_on_failure("move", janus, mesh):
        try:
            main_pub = await _publisher(janus, klass.inst, klass.id)
            sessions.append(main_pub)
            sessions.append(await _publisher(janus, klass.students[b], klass.id, room))
            sub, remote = await _subscriber(janus, klass.students[a], klass.id)
            sessions.append(sub)
            await _frame(remote["video"], 5)
            inst = klass.inst.media
            await inst.move_participant(
                request_id=uuid.uuid4().hex,
                session_id=klass.id,
                user_id=a,
                to_breakout_room_id=room,
            )
            await sub.wait_moved(1)
            tracks = await sub.wait_tracks(2)
            assert {t.user_id for t in tracks} == {b}
            await sub.subscribe([t.id for t in tracks])
            moved: dict[str, Any] = {}
            for _ in range(2):
                track = await sub.next_remote_track(timeout=10)
                moved[track.kind] = track
            frame = await _frame(moved["video"], 5)
            assert (frame.width, frame.height) == (640, 360)
            await _silent(remote["video"])
            # The instructor (a publisher) joins the room too.
            done = await inst.move_participant(
                request_id=uuid.uuid4().hex,
                session_id=klass.id,
                user_id=klass.teacher,
                to_breakout_room_id=room,
            )
            assert done.to_router.breakout_room_id == room
            await main_pub.wait_moved(1)
            tracks = await sub.wait_tracks(4)
            teacher_tracks = [t.id for t in tracks if t.user_id == klass.teacher]
            assert len(teacher_tracks) == 2
            await sub.subscribe(teacher_tracks)
            fresh: dict[str, Any] = {}
            for _ in range(2):
                track = await sub.next_remote_track(timeout=10)
                fresh[track.kind] = track
            frame = await _frame(fresh["video"], 5)
            assert (frame.width, frame.height) == (640, 360)
        finally:
            for s in sessions:
                await s.close()
