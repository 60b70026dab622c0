"""A class joined from real browsers: headless Debian Chromium (Selenium) runs the classroom
page the gateway serves (sdk/web page on `@classmesh/web`, grpc-web through the gateway of
`classmesh up`), a teacher drives the class with the Python SDK.

Two students join from their browsers and land in the lobby; the teacher admits them; they
see the roster, chat both ways, raise a hand, answer a poll and all see its results. Media:
the teacher publishes aiortc video, a browser subscribes and its <video> element decodes
frames; the other browser publishes its fake camera and the teacher's aiortc peer decodes
it. The browser's media survives a killed media worker (MediaRestarted) and follows a move
to a breakout room (RouterMoved). A staff member admits a lobby student from the page; a
guest joins with the join link. sdk/web/test/ runs the built package in Node against the
same gateway. On failure every browser's screenshot, console and HTML land in
tests/artifacts/<test>/.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
from aiortc import VideoStreamTrack
from av import VideoFrame

from classmesh.interaction.v1 import interaction_pb2
from classmesh.session.v1 import session_pb2
from classmesh_sdk import MediaSession
from tests.conftest import ROOT
from tests.support.browser import Browser, build_page, require_chromium
from tests.support.classroom import (
    Feed,
    Mesh,
    classroom_mesh,
    live_class,
    open_breakout_room,
    scope,
    ts,
    uid,
)

S = session_pb2
I = interaction_pb2  # noqa: E741
LOOPBACK = ["127.0.0.1"]


class Pattern(VideoStreamTrack):
    """Synthetic video (a moving bar, 320x240 unless told), VP8-encoded by aiortc."""

    def __init__(self, width: int = 320, height: int = 240) -> None:
        super().__init__()
        self.n = 0
        self.size = (width, height)

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        width, height = self.size
        frame = VideoFrame(width=width, height=height, format="yuv420p")
        x = (self.n * 4) % (width - 40)
        row = bytes(x) + bytes([235]) * 40 + bytes(width - 40 - x)
        frame.planes[0].update(row * height)
        for plane in frame.planes[1:]:
            plane.update(bytes([128]) * (plane.line_size * plane.height))
        self.n += 1
        frame.pts, frame.time_base = pts, time_base
        return frame


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    require_chromium()
    await asyncio.to_thread(build_page)
    async with classroom_mesh(
        admin_database_url,
        redis_url,
        tmp_path_factory,
        "browser",
        extra_env={"CLASSMESH_MEDIA_ICE_HOSTS": "127.0.0.1"},
    ) as m:
        assert m.proc.gateway.startswith("http://"), m.proc.lines
        yield m


@contextlib.asynccontextmanager
async def browsers(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[[str], Awaitable[Browser]]]:
    """A factory of browsers (started in a thread: the loop keeps serving the teacher's
    peers); all are closed at the end, and on failure each one's screenshot, console and
    HTML are saved under tests/artifacts/<test>/."""
    opened: list[Browser] = []

    async def open_browser(name: str) -> Browser:
        b = await asyncio.to_thread(Browser, name)
        opened.append(b)
        return b

    try:
        yield open_browser
    except BaseException:
        for b in opened:
            out = await asyncio.to_thread(b.save_artifacts, request.node.name)
        if opened:
            print(f"browser artifacts saved in {out}")
        raise
    finally:
        for b in opened:
            await asyncio.to_thread(b.quit)


async def lobby_class(mesh: Mesh, *, guests: bool = False) -> tuple[str, str, Any]:
    """A live class with the lobby on; its instructor joined. Returns (id, teacher, client)."""
    teacher = uid("teacher")
    inst = mesh.client(teacher, "instructor")
    start = datetime.now(UTC) + timedelta(minutes=1)
    created = await inst.sessions.create_session(
        title=f"Browser class {secrets.token_hex(3)}",
        instructor_id=teacher,
        scheduled_start=ts(start),
        scheduled_end=ts(start + timedelta(hours=2)),
        settings=S.SessionSettings(
            lobby_enabled=True, chat_enabled=True, qa_enabled=True, allow_guests=guests
        ),
    )
    sid = created.session.id
    await inst.sessions.start_session(session_id=sid)
    me = (await inst.sessions.join_session(session_id=sid)).participant
    assert me.status == S.PARTICIPANT_STATUS_ADMITTED, me
    return sid, teacher, inst


def page_url(mesh: Mesh, user: str, role: str, sid: str, name: str) -> str:
    token = mesh.token(user, role, name=name)
    return f"{mesh.proc.gateway}/?{urlencode({'token': token, 'session': sid})}"


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 15.0, what: str = "condition"
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ok = check()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        if loop.time() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        await asyncio.sleep(0.2)


ROSTER = (
    "return [...document.querySelectorAll('[data-testid=roster-item]')].map(e => e.dataset.userId);"
)
STATUS = "return document.getElementById('status').dataset.status;"
#: A chat message sent with the page's own client; resolves with the decoded outcome.
CHAT_FROM_PAGE = """
const done = arguments[arguments.length - 1];
const cm = window.classmesh;
cm.client.interaction
  .sendChatMessage({scope: {sessionId: cm.sessionId}, text: arguments[0], type: 1})
  .then(() => done({ok: true}),
        (e) => { const x = window.classmeshErrors.from(e);
                 done({ok: false, code: x.codeName, reason: x.reason, domain: x.domain}); });
"""
FRAMES = """
const v = document.querySelector('[data-testid=remote-video]');
if (!v) return null;
return {frames: v.getVideoPlaybackQuality().totalVideoFrames, presented: +v.dataset.frames,
        width: v.videoWidth, height: v.videoHeight, user: v.dataset.userId};
"""


@pytest.mark.timeout(300)
async def test_two_browser_students_lobby_chat_poll_and_media(
    mesh: Mesh, request: pytest.FixtureRequest
) -> None:
    sid, teacher, inst = await lobby_class(mesh)
    feed = Feed(inst, sid)
    ada, bob = uid("ada"), uid("bob")
    teacher_media: MediaSession | None = None
    try:
        async with browsers(request) as open_browser:
            a, b = await asyncio.gather(open_browser("ada"), open_browser("bob"))
            # --- both join from the page (?token=&session=) and wait in the lobby
            await asyncio.gather(
                a.open(page_url(mesh, ada, "student", sid, "Ada")),
                b.open(page_url(mesh, bob, "student", sid, "Bob")),
            )
            for br in (a, b):
                await br.wait(STATUS, lambda s: s == "lobby", what="lobby status")
                assert await br.js("return !document.getElementById('lobby-wait').hidden")
                assert await br.js("return document.getElementById('classroom').hidden")
            lobby = await inst.sessions.list_participants(
                session_id=sid, statuses=[S.PARTICIPANT_STATUS_LOBBY]
            )
            assert {p.user_id for p in lobby.participants} == {ada, bob}
            # From the lobby the API refuses to chat: the error's google.rpc details reach
            # the browser through grpc-web and the SDK decodes them.
            refused = await a.js_async(CHAT_FROM_PAGE, "let me in")
            assert refused == {
                "ok": False,
                "code": "PermissionDenied",
                "reason": "NOT_ADMITTED",
                "domain": "classmesh.dev",
            }, refused
            # --- the teacher admits them; the page switches to the classroom
            admitted = await inst.sessions.admit_participants(session_id=sid, user_ids=[ada, bob])
            assert {p.user_id for p in admitted.admitted} == {ada, bob}
            for br in (a, b):
                await br.wait(STATUS, lambda s: s == "admitted", what="admitted status")
                roster = await br.wait(
                    ROSTER, lambda r: set(r) >= {teacher, ada, bob}, what="full roster"
                )
                assert len(roster) == 3, roster
            roles = sorted(await a.attrs("roster-item", "data-role"))
            assert roles == ["instructor", "student", "student"], roles
            # Students see no lobby panel.
            assert await a.js("return document.getElementById('lobby').hidden")

            # --- chat both ways
            await a.type("chat-input", "hello from Ada's browser")
            await a.click("chat-send")
            posted = await feed.wait_for(
                lambda e: (
                    e.WhichOneof("payload") == "chat_message_posted"
                    and e.chat_message_posted.message.sender.user_id == ada
                ),
                what="Ada's chat message on the teacher's feed",
            )
            assert posted.chat_message_posted.message.text == "hello from Ada's browser"
            await inst.interaction.send_chat_message(
                scope=scope(sid), text="welcome, class", type=I.CHAT_MESSAGE_TYPE_TEXT
            )
            for br in (a, b):
                texts = await br.wait(
                    "return [...document.querySelectorAll('[data-testid=chat-text]')]"
                    ".map(e => e.textContent);",
                    lambda t: "welcome, class" in t and "hello from Ada's browser" in t,
                    what="both chat messages",
                )
                assert texts.index("hello from Ada's browser") < texts.index("welcome, class")
            senders = await b.attrs("chat-message", "data-sender")
            assert senders[:2] == [ada, teacher], senders

            # --- raise hand
            await b.click("raise-hand")
            raised = await feed.wait_for(
                lambda e: e.WhichOneof("payload") == "hand_raised",
                what="Bob's raised hand on the teacher's feed",
            )
            assert raised.hand_raised.hand_raise.raiser.user_id == bob
            await b.wait(
                "return document.getElementById('hand-state').dataset.state;",
                lambda s: s == "raised",
                what="Bob's hand state",
            )
            await a.wait(
                "return document.querySelector(`[data-testid=roster-item]"
                "[data-user-id='${arguments[0]}']`).dataset.hand;",
                lambda s: s == "raised",
                what="Bob's hand in Ada's roster",
                args=(bob,),
            )

            # --- a poll: both answer, everyone sees the results
            poll = (
                await inst.interaction.create_poll(
                    scope=scope(sid),
                    question="Ready for the quiz?",
                    options=["Yes", "No", "Maybe"],
                    kind=I.POLL_KIND_SINGLE_CHOICE,
                    show_results_live=True,
                )
            ).poll
            for br, choice in ((a, 0), (b, 2)):
                await br.wait(
                    "return document.querySelectorAll('[data-testid=poll-option]').length;",
                    lambda n: n == 3,
                    what="the poll's options",
                )
                assert await br.texts("poll-question") == ["Ready for the quiz?"]
                await br.click("poll-option", index=str(choice))
            expected = ["1", "0", "1"]
            for br in (a, b):
                await br.wait(
                    "return document.querySelector('[data-testid=poll-respondents]')"
                    ".dataset.count;",
                    lambda c: c == "2",
                    what="2 poll respondents",
                )
                counts = await br.wait(
                    "return [...document.querySelectorAll('[data-testid=poll-result]')]"
                    ".map(e => e.textContent.trim());",
                    lambda c: c == expected,
                    what=f"poll counts {expected}",
                )
                assert counts == expected
            results = await inst.interaction.get_poll_results(session_id=sid, poll_id=poll.id)
            assert [o.count for o in results.results.options] == [1, 0, 1]
            assert results.results.respondent_count == 2

            # --- media: the teacher's aiortc video decoded in Ada's browser
            teacher_media = MediaSession(inst, sid, ice_hosts=LOOPBACK)
            await teacher_media.start()
            (video_track,) = await teacher_media.publish(Pattern())
            clock = asyncio.get_running_loop().time
            t0 = clock()
            await a.click("watch-media")
            seen = await a.wait(
                FRAMES,
                lambda v: bool(v) and v["frames"] > 0 and v["presented"] > 0,
                timeout=30,
                what="decoded frames of the teacher's video",
            )
            print(f"figure: Ada's first decoded teacher frame {clock() - t0:.2f} s after the click")
            assert (seen["width"], seen["height"]) == (320, 240), seen
            assert seen["user"] == teacher, seen
            before = seen["frames"]
            await a.wait(
                FRAMES,
                lambda v: v["frames"] > before + 10,
                timeout=15,
                what="the teacher's video still playing",
            )

            # --- media: Bob's fake camera decoded by the teacher's aiortc peer
            t0 = clock()
            await b.click("publish-camera")
            await b.wait(
                "return document.getElementById('publish-state').dataset.tracks || '';",
                lambda t: len(t.split(",")) == 2,
                timeout=20,
                what="Bob's camera and microphone published",
            )

            def bob_video() -> Any:
                return next(
                    (
                        t
                        for t in teacher_media.tracks.values()
                        if t.user_id == bob and t.kind == 2  # TRACK_KIND_VIDEO
                    ),
                    None,
                )

            await eventually(
                lambda: bob_video() is not None, what="Bob's video track announced to the teacher"
            )
            bob_track = bob_video()
            assert bob_track is not None
            await teacher_media.subscribe([bob_track.id])
            remote = await teacher_media.next_remote_track(timeout=15)
            assert remote.kind == "video"
            frame = await asyncio.wait_for(remote.recv(), 20)
            print(f"figure: teacher's first decoded frame of Bob's camera {clock() - t0:.2f} s")
            assert isinstance(frame, VideoFrame)
            assert frame.width > 0 and frame.height > 0
            for _ in range(5):
                frame = await asyncio.wait_for(remote.recv(), 5)
            # Chromium's fake camera is 640x480; under CPU load its encoder may scale down,
            # never changing the aspect ratio.
            assert frame.width * 3 == frame.height * 4, (frame.width, frame.height)
            assert 160 <= frame.width <= 640, (frame.width, frame.height)
            assert video_track.user_id == teacher

            # ICE trickled from the browsers (the server accepted every candidate).
            ada_ice = await a.js("return window.classmesh.media.candidates;")
            bob_ice = await b.js("return window.classmesh.media.candidates;")
            assert ada_ice["sent"]["subscriber"] > 0, ada_ice
            assert bob_ice["sent"]["publisher"] > 0, bob_ice
            assert ada_ice["failed"] == bob_ice["failed"] == {"publisher": 0, "subscriber": 0}

            # Nothing on the pages failed: no error shown, no error in the console.
            for br in (a, b):
                assert await br.js("return document.getElementById('error').hidden"), (
                    await br.texts("error")
                )
                await asyncio.to_thread(br.collect_console)
                severe = [e for e in br.console if e.get("level") == "SEVERE"]
                assert not severe, (br.name, severe)
    finally:
        if teacher_media is not None:
            await teacher_media.close()
        await feed.stop()


@pytest.mark.timeout(180)
async def test_staff_admits_from_the_page(mesh: Mesh, request: pytest.FixtureRequest) -> None:
    sid, teacher, inst = await lobby_class(mesh)
    assistant = uid("assistant")
    student = uid("student")
    sc = mesh.client(student, "student")
    async with browsers(request) as open_browser:
        staff = await open_browser("assistant")
        await staff.open(page_url(mesh, assistant, "assistant", sid, "Assistant"))
        await staff.wait(STATUS, lambda s: s == "admitted", what="assistant admitted at once")
        assert not await staff.js("return document.getElementById('lobby').hidden")
        joined = await sc.sessions.join_session(session_id=sid)
        assert joined.participant.status == S.PARTICIPANT_STATUS_LOBBY
        await staff.wait(
            "return [...document.querySelectorAll('[data-testid=lobby-item]')]"
            ".map(e => e.dataset.userId);",
            lambda ids: ids == [student],
            what="the student in the lobby panel",
        )
        await staff.click("admit-button", user_id=student)
        await eventually(
            lambda: _status_is(sc, sid, S.PARTICIPANT_STATUS_ADMITTED),
            what="the student admitted",
        )
        await staff.wait(ROSTER, lambda r: student in r, what="the student in the roster")
        assert await staff.js("return document.getElementById('lobby-count').textContent") == "0"
        assert set(await staff.attrs("roster-item", "data-user-id")) == {
            teacher,
            assistant,
            student,
        }


@pytest.mark.timeout(180)
async def test_guest_joins_with_the_link(mesh: Mesh, request: pytest.FixtureRequest) -> None:
    """No token: the page joins with the join link and a name, waits in the lobby, and once
    admitted chats with the session-scoped guest token the server handed it."""
    sid, teacher, inst = await lobby_class(mesh, guests=True)
    link = (await inst.sessions.get_session(session_id=sid)).session.join_link_token
    assert len(link) == 64
    feed = Feed(inst, sid)
    try:
        async with browsers(request) as open_browser:
            g = await open_browser("guest")
            await g.open(f"{mesh.proc.gateway}/?{urlencode({'join': link, 'name': 'Grace'})}")
            await g.wait(STATUS, lambda s: s == "lobby", what="the guest in the lobby")
            me = await g.js("return document.getElementById('me').dataset;")
            assert me["role"] == "guest", me
            lobby = await inst.sessions.list_participants(
                session_id=sid, statuses=[S.PARTICIPANT_STATUS_LOBBY]
            )
            (guest,) = lobby.participants
            assert guest.guest and guest.display_name == "Grace"
            assert guest.user_id == me["userId"]
            await inst.sessions.admit_participants(session_id=sid, user_ids=[guest.user_id])
            await g.wait(STATUS, lambda s: s == "admitted", what="the guest admitted")
            await g.wait(ROSTER, lambda r: set(r) == {teacher, guest.user_id}, what="roster")
            await g.type("chat-input", "hi, I am a guest")
            await g.click("chat-send")
            posted = await feed.wait_for(
                lambda e: (
                    e.WhichOneof("payload") == "chat_message_posted"
                    and e.chat_message_posted.message.sender.user_id == guest.user_id
                ),
                what="the guest's message",
            )
            assert posted.chat_message_posted.message.text == "hi, I am a guest"
            assert posted.chat_message_posted.message.sender.display_name == "Grace"
    finally:
        await feed.stop()


async def _status_is(client: Any, sid: str, status: int) -> bool:
    p = await client.sessions.get_participant(session_id=sid)
    return bool(p.participant.status == status)


LIVE_FRAMES = """
const live = [...document.querySelectorAll('[data-testid=remote-video]')].filter(
  v => v.srcObject && v.srcObject.getVideoTracks().some(t => t.readyState === 'live'));
return live.map(v => ({frames: v.getVideoPlaybackQuality().totalVideoFrames,
                       user: v.dataset.userId, width: v.videoWidth}));
"""


@pytest.mark.timeout(180)
async def test_browser_media_survives_a_media_worker_restart(
    mesh: Mesh, request: pytest.FixtureRequest
) -> None:
    """The media worker forwarding the room is killed: the server re-creates the router and
    tells every client to renegotiate (MediaRestarted). The browser's MediaSession builds new
    connections, offers its camera again and subscribes again; video flows both ways again."""
    klass = await live_class(mesh)
    teacher_media = MediaSession(klass.inst, klass.id, ice_hosts=LOOPBACK)
    cy = uid("cy")
    try:
        await teacher_media.start()
        await teacher_media.publish(Pattern())
        async with browsers(request) as open_browser:
            c = await open_browser("cy")
            await c.open(page_url(mesh, cy, "student", klass.id, "Cy"))
            await c.wait(STATUS, lambda s: s == "admitted", what="admitted (no lobby)")
            await c.click("publish-camera")
            # Publishing starts the media session, which subscribes to the teacher's video.
            await c.wait(
                LIVE_FRAMES,
                lambda v: len(v) == 1 and v[0]["frames"] > 0 and v[0]["user"] == klass.teacher,
                timeout=30,
                what="the teacher's video decoded",
            )
            await eventually(
                lambda: any(t.user_id == cy and t.kind == 2 for t in teacher_media.tracks.values()),
                what="Cy's camera announced to the teacher",
            )
            cy_video = next(
                t for t in teacher_media.tracks.values() if t.user_id == cy and t.kind == 2
            )
            await teacher_media.subscribe([cy_video.id])
            first = await teacher_media.next_remote_track(timeout=15)
            await asyncio.wait_for(first.recv(), 20)
            # Kill the worker that forwards this room.
            admin = mesh.client(uid("admin"), "admin")
            (router,) = (await admin.media.list_routers(session_id=klass.id)).routers
            stats = await admin.media.get_media_stats(session_id=klass.id)
            (worker,) = [w for w in stats.workers if w.worker_id == router.node_id]
            os.kill(worker.pid, signal.SIGKILL)
            # The page renegotiated: one restart, new video from the teacher decoded.
            await c.wait(
                "return document.getElementById('media-state').dataset.restarts;",
                lambda n: n == "1",
                timeout=20,
                what="the browser's MediaSession told of the restart",
            )
            fresh = await c.wait(
                LIVE_FRAMES,
                lambda v: len(v) == 1 and v[0]["frames"] > 0,
                timeout=30,
                what="the teacher's video decoded again after the restart",
            )
            assert fresh[0]["user"] == klass.teacher, fresh
            # The browser offered its camera again (same track id): the teacher decodes it.
            await teacher_media.wait_restarted(1, timeout=20)
            again = await teacher_media.next_remote_track(timeout=20)
            if again.kind != "video":
                again = await teacher_media.next_remote_track(timeout=20)
            frame = await asyncio.wait_for(again.recv(), 20)
            assert isinstance(frame, VideoFrame) and frame.width > 0
            assert cy_video.id in teacher_media.tracks
            assert await c.js("return document.getElementById('error').hidden"), await c.texts(
                "error"
            )
            restarted = await c.js(
                "return window.classmesh.media.signals"
                ".filter(s => s.message.case === 'mediaRestarted').length;"
            )
            assert restarted == 1
    finally:
        await teacher_media.close()


@pytest.mark.timeout(180)
async def test_browser_media_follows_a_move_to_a_breakout_room(
    mesh: Mesh, request: pytest.FixtureRequest
) -> None:
    """MoveParticipant sends the browser's media to a breakout room (RouterMoved): its
    MediaSession replaces the subscriber connection, the page drops the main room's video and
    subscribes to the room's tracks, and decodes the video published there."""
    klass = await live_class(mesh, students=1)
    (buddy,) = klass.students
    dee = uid("dee")
    main_pub = MediaSession(klass.inst, klass.id, ice_hosts=LOOPBACK)
    room_pub: MediaSession | None = None
    try:
        await main_pub.start()
        await main_pub.publish(Pattern())
        async with browsers(request) as open_browser:
            d = await open_browser("dee")
            await d.open(page_url(mesh, dee, "student", klass.id, "Dee"))
            await d.wait(STATUS, lambda s: s == "admitted", what="admitted (no lobby)")
            room = await open_breakout_room(mesh, klass.id, [dee, buddy])
            room_pub = MediaSession(
                klass.students[buddy], klass.id, breakout_room_id=room, ice_hosts=LOOPBACK
            )
            await room_pub.start()
            await room_pub.publish(Pattern(160, 120))
            await d.click("watch-media")
            await d.wait(
                LIVE_FRAMES,
                lambda v: len(v) == 1 and v[0]["frames"] > 0 and v[0]["user"] == klass.teacher,
                timeout=30,
                what="the main room's video decoded",
            )
            moved = await klass.inst.media.move_participant(
                session_id=klass.id, user_id=dee, to_breakout_room_id=room
            )
            assert moved.to_router.breakout_room_id == room
            await d.wait(
                "return window.classmesh.media.breakoutRoomId;",
                lambda r: r == room,
                what="the browser's media in the breakout room",
            )
            videos = await d.wait(
                LIVE_FRAMES,
                lambda v: len(v) == 1 and v[0]["user"] == buddy and v[0]["frames"] > 0,
                timeout=30,
                what="the breakout room's video decoded",
            )
            assert videos[0]["width"] == 160, videos
            assert await d.js("return document.getElementById('error').hidden"), await d.texts(
                "error"
            )
    finally:
        for m in (room_pub, main_pub):
            if m is not None:
                await m.close()


@pytest.mark.timeout(180)
async def test_web_sdk_in_node(mesh: Mesh) -> None:
    """sdk/web/test/*.test.mjs: the built @classmesh/web package against this gateway (typed
    clients, bearer auth, request ids, error details, feeds resumed after a cut)."""
    node = shutil.which("node")
    assert node, "Node.js is required (README: make test needs Node.js)"
    klass = await live_class(mesh)
    env = {
        **os.environ,
        "CLASSMESH_GATEWAY_URL": mesh.proc.gateway,
        "CLASSMESH_TEACHER_TOKEN": mesh.token(klass.teacher, "instructor"),
        "CLASSMESH_STUDENT_TOKEN": mesh.token(uid("student"), "student"),
        "CLASSMESH_SESSION_ID": klass.id,
    }
    proc = await asyncio.create_subprocess_exec(
        node,
        "--test",
        "--test-reporter=spec",
        "sdk/web/test/",
        cwd=str(ROOT),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 150)
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report
    assert "# fail 0" in report or "ℹ fail 0" in report, report
    assert "ℹ pass 8" in report or "# pass 8" in report, report
