"""The classroom page follows breakout rooms (headless Debian Chromium through the gateway of
`classmesh up`; the teacher drives BreakoutService with the Python SDK).

The teacher has a main-room chat; two students join from their browsers, a third browser
is the teacher's own page (staff view). The teacher opens two rooms with one student each:
each student's page names its room, its chat, roster and hand raise are the room's (a chat
typed in room 1 reaches browser 1 and never browser 2; the hand is raised in room 1's
queue), the staff page lists both open rooms with their counts, and the teacher's broadcast
shows in both rooms' banners. Closing all rooms brings both pages back to the main room's
chat (its history again, no room message), where a new teacher message reaches both. A
second round (assigned without moving, so chat is already the room's): the page follows
the assignment, a page reloaded inside the room starts there and offers to enter it
(JoinBreakoutRoom, for media), and closing that one room brings it back to the main chat. On
failure every browser's screenshot, console and HTML land in tests/artifacts/<test>/.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlencode

import pytest

from classmesh.breakout.v1 import breakout_pb2, breakout_service_pb2
from tests.support.browser import Browser, build_page, require_chromium
from tests.support.classroom import Mesh, classroom_mesh, live_class, scope, uid

B = breakout_pb2
BS = breakout_service_pb2

ROOM = (
    "const r = document.getElementById('room-name');"
    "return {id: r.dataset.roomId, room: r.dataset.room, name: r.textContent,"
    " chat: document.getElementById('chat-log').dataset.roomId};"
)
CHATS = "return [...document.querySelectorAll('[data-testid=chat-text]')].map(e => e.textContent);"
ROSTER = (
    "return [...document.querySelectorAll('[data-testid=roster-item]')]"
    ".map(e => e.dataset.userId).sort();"
)
BROADCASTS = (
    "const box = document.getElementById('broadcasts');"
    "return box.hidden ? [] : [...box.querySelectorAll('[data-testid=broadcast-text]')]"
    ".map(e => e.textContent);"
)
ROOMS = (
    "return [...document.querySelectorAll('[data-testid=breakout-room-item]')]"
    ".map(e => [e.dataset.name, +e.dataset.count]).sort();"
)
STATUS = "return document.getElementById('status').dataset.status;"


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
        "browser-breakout",
        extra_env={"CLASSMESH_MEDIA_ICE_HOSTS": "127.0.0.1"},
    ) as m:
        assert m.proc.gateway.startswith("http://"), m.proc.lines
        yield m


@contextlib.asynccontextmanager
async def browsers(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[[str], Awaitable[Browser]]]:
    """Browsers without fake media devices (this test needs none); closed at the end, and
    on failure each one's screenshot, console and HTML are saved."""
    opened: list[Browser] = []

    async def open_browser(name: str) -> Browser:
        b = await asyncio.to_thread(Browser, name, media=False)
        opened.append(b)
        return b

    try:
        yield open_browser
    except BaseException:
        for b in opened:
            out = await asyncio.to_thread(b.save_artifacts, request.node.name)
            print(f"browser artifacts saved in {out}")
        raise
    finally:
        for b in opened:
            await asyncio.to_thread(b.quit)


def page_url(mesh: Mesh, user: str, role: str, sid: str, name: str) -> str:
    token = mesh.token(user, role, name=name)
    return f"{mesh.proc.gateway}/?{urlencode({'token': token, 'session': sid})}"


async def settled(b: Browser, script: str, expected: object, what: str) -> None:
    """`script` returns `expected` now and still does 1 s later (nothing more arrives)."""
    await b.wait(script, lambda v: v == expected, what=what)
    await asyncio.sleep(1.0)
    assert await b.js(script) == expected, what


def in_room(room_id: str) -> Callable[[dict[str, str]], bool]:
    """The page names `room_id` and shows that room's chat."""
    return lambda r: r["id"] == room_id and r["chat"] == room_id


@pytest.mark.timeout(240)
async def test_pages_follow_breakout_rooms(mesh: Mesh, request: pytest.FixtureRequest) -> None:
    klass = await live_class(mesh)
    inst, sid = klass.inst, klass.id
    await inst.interaction.send_chat_message(scope=scope(sid), text="welcome to class")
    ada, bob = uid("ada"), uid("bob")
    async with browsers(request) as open_browser:
        a, b, t = await asyncio.gather(
            open_browser("ada"), open_browser("bob"), open_browser("teacher")
        )
        await asyncio.gather(
            a.open(page_url(mesh, ada, "student", sid, "Ada")),
            b.open(page_url(mesh, bob, "student", sid, "Bob")),
            t.open(page_url(mesh, klass.teacher, "instructor", sid, "Teacher")),
        )
        for br in (a, b, t):
            await br.wait(STATUS, lambda s: s == "admitted", what="admitted")
            await br.wait(ROOM, lambda r: r["room"] == "main" and r["chat"] == "", what="main")
            await br.wait(CHATS, lambda c: c == ["welcome to class"], what="main chat history")
        assert await t.js("return document.getElementById('breakout-panel').hidden;") is False
        assert await a.js("return document.getElementById('breakout-panel').hidden;") is True
        assert await t.js(ROOMS) == []

        # --- two rooms, one student each, moved at once
        clock = asyncio.get_running_loop().time
        started = clock()
        created = await inst.breakouts.create_breakout_rooms(
            session_id=sid,
            explicit=BS.ExplicitRooms(
                rooms=[
                    B.BreakoutRoomSpec(name="Red room", capacity=2, user_ids=[ada]),
                    B.BreakoutRoomSpec(name="Blue room", capacity=2, user_ids=[bob]),
                ]
            ),
        )
        red, blue = (r.id for r in created.rooms)
        for br, rid, name in ((a, red, "Red room"), (b, blue, "Blue room")):
            got = await br.wait(ROOM, in_room(rid), what=name)
            assert got == {"id": rid, "room": "breakout", "name": name, "chat": rid}
            # The room's chat replaces the main one; the roster is the room's.
            await br.wait(CHATS, lambda c: c == [], what="an empty room chat")
        print(f"both pages in their rooms {clock() - started:.2f} s after CreateBreakoutRooms")
        await a.wait(ROSTER, lambda r: r == [ada], what="room 1 roster")
        await b.wait(ROSTER, lambda r: r == [bob], what="room 2 roster")
        # The staff page: both open rooms, one participant each; the teacher stays in main.
        await t.wait(
            ROOMS, lambda r: r == [["Blue room", 1], ["Red room", 1]], what="open rooms listed"
        )
        assert (await t.js(ROOM))["room"] == "main"
        assert await t.js("return document.getElementById('breakout-count').textContent;") == "2"

        # --- a chat typed in room 1 reaches browser 1 only
        await a.type("chat-input", "red team only")
        await a.click("chat-send")
        await a.wait(CHATS, lambda c: c == ["red team only"], what="room 1 chat in browser 1")
        red_chat = await inst.interaction.list_chat_messages(scope=scope(sid, red))
        assert [m.text for m in red_chat.messages] == ["red team only"]
        main_chat = await inst.interaction.list_chat_messages(scope=scope(sid))
        assert [m.text for m in main_chat.messages] == ["welcome to class"]
        await b.type("chat-input", "blue team here")
        await b.click("chat-send")
        await b.wait(CHATS, lambda c: c == ["blue team here"], what="room 2 chat in browser 2")
        # A hand raised from the page is in room 1's queue, not the main room's.
        await a.click("raise-hand")
        await a.wait(
            "return document.getElementById('hand-state').dataset.state;",
            lambda s: s == "raised",
            what="hand raised",
        )
        hands = await inst.interaction.list_raised_hands(scope=scope(sid, red))
        assert [h.raiser.user_id for h in hands.hand_raises] == [ada]
        assert not (await inst.interaction.list_raised_hands(scope=scope(sid))).hand_raises
        await a.wait(
            "return [...document.querySelectorAll('[data-testid=roster-item]')]"
            ".map(e => e.dataset.hand);",
            lambda h: h == ["raised"],
            what="raised hand in the room roster",
        )

        # --- the teacher's broadcast shows in both rooms (and on the staff page)
        sent = await inst.breakouts.broadcast_to_breakout_rooms(
            session_id=sid, text="Two minutes left"
        )
        assert sorted(sent.message.breakout_room_ids) == sorted([red, blue])
        for br in (a, b, t):
            await br.wait(BROADCASTS, lambda x: x == ["Two minutes left"], what="broadcast")
        # Nothing leaked between the rooms meanwhile.
        await settled(a, CHATS, ["red team only"], "room 1 chat only in browser 1")
        await settled(b, CHATS, ["blue team here"], "room 2 chat only in browser 2")

        # --- close all: both pages return to the main room's chat
        started = clock()
        closed = await inst.breakouts.close_all_breakout_rooms(session_id=sid)
        assert sorted(closed.returned_user_ids) == sorted([ada, bob])
        for br in (a, b):
            got = await br.wait(
                ROOM, lambda r: r["room"] == "main" and r["chat"] == "", what="back in main"
            )
            assert got["name"] == "Main room"
            await br.wait(CHATS, lambda c: c == ["welcome to class"], what="main chat again")
            assert await br.js(BROADCASTS) == []
            await br.wait(
                "return document.getElementById('hand-state').dataset.state;",
                lambda s: s == "down",
                what="no room hand in the main room",
            )
        print(f"both pages back in the main chat {clock() - started:.2f} s after CloseAll")
        await t.wait(ROOMS, lambda r: r == [], what="no open rooms")
        assert await t.js("return document.getElementById('breakout-count').textContent;") == "0"
        everyone = sorted([ada, bob, klass.teacher])
        for br in (a, b, t):
            await br.wait(ROSTER, lambda r: r == everyone, what="main roster")
        await inst.interaction.send_chat_message(scope=scope(sid), text="welcome back")
        for br in (a, b, t):
            await settled(
                br, CHATS, ["welcome to class", "welcome back"], "the teacher's main message"
            )
        # The page sends into the main room again.
        await b.type("chat-input", "bob in main")
        await b.click("chat-send")
        for br in (a, b):
            await br.wait(
                CHATS,
                lambda c: c == ["welcome to class", "welcome back", "bob in main"],
                what="a main-room chat from the page",
            )

        # --- a second round, one room: a reloaded page starts in its room (the feed's
        # replay of the first round does not move it); closing that one room brings it back.
        again = await inst.breakouts.create_breakout_rooms(
            session_id=sid,
            explicit=BS.ExplicitRooms(
                rooms=[B.BreakoutRoomSpec(name="Green room", capacity=2, user_ids=[ada])]
            ),
            # Assigned, not moved: chat and hands are already the room's (media waits for
            # JoinBreakoutRoom), so the page follows the assignment.
            move_immediately=False,
        )
        green = again.rooms[0].id
        await a.wait(ROOM, in_room(green), what="Green room")
        await t.wait(ROOMS, lambda r: r == [["Green room", 1]], what="one open room")
        await a.open(page_url(mesh, ada, "student", sid, "Ada"))
        await a.wait(STATUS, lambda s: s == "admitted", what="admitted after reload")
        # The reloaded page knows the room from its join; its name comes from GetBreakoutRoom.
        got = await a.wait(
            ROOM,
            lambda r: in_room(green)(r) and r["name"] == "Green room",
            what="Green room (named) after reload",
        )
        assert got["room"] == "breakout"
        await settled(a, CHATS, [], "the Green room's empty chat after reload")
        await a.type("chat-input", "green team")
        await a.click("chat-send")
        await a.wait(CHATS, lambda c: c == ["green team"], what="a Green room chat")
        green_chat = await inst.interaction.list_chat_messages(scope=scope(sid, green))
        assert [m.text for m in green_chat.messages] == ["green team"]
        # Not entered yet (media stays in the main room): the page offers to enter.
        enter = "return !document.getElementById('enter-room').hidden;"
        assert await a.js(enter) is True
        assert await b.js(enter) is False
        await a.click("enter-room")
        await a.wait(enter, lambda v: v is False, what="the room entered")
        room = (await inst.breakouts.get_breakout_room(breakout_room_id=green)).room
        assert [p.HasField("joined_at") for p in room.participants] == [True], room
        await a.open(page_url(mesh, ada, "student", sid, "Ada"))
        await a.wait(ROOM, in_room(green), what="Green room after another reload")
        await settled(a, enter, False, "no offer to enter a room already entered")
        assert (await b.js(ROOM))["room"] == "main"
        await inst.breakouts.close_breakout_room(breakout_room_id=green)
        await a.wait(ROOM, lambda r: r["room"] == "main" and r["chat"] == "", what="main again")
        await a.wait(
            CHATS,
            lambda c: c == ["welcome to class", "welcome back", "bob in main"],
            what="the main chat after the room closed",
        )
        await t.wait(ROOMS, lambda r: r == [], what="no open rooms after the close")
        for br in (a, b, t):
            errors = await br.js(
                "const e = document.getElementById('error'); return e.hidden ? '' : e.textContent;"
            )
            assert errors == "", (br.name, errors)
