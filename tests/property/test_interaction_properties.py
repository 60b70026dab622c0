"""Seed 003 correctness properties 12-16, 19, 20, 35 and 36 as hypothesis properties, against
a real `classmesh up` (gRPC, PostgreSQL, Redis) through the SDK:

  12 a message that is empty (after trimming) or longer than 1000 characters is refused
     (INVALID_ARGUMENT) and nothing is stored
  13 a valid message is stored with user, room (session/breakout), content, type, time
  14 TEXT, EMOJI and POLL messages are accepted and stored with their type (POLL is a
     moderator's message in ClassMesh: a student's POLL is PERMISSION_DENIED)
  15 XSS patterns (<script>, javascript:, onerror=, any case and spacing) never survive in
     what is stored or sent
  16 a message directed from A to B in the same room reaches B with A as sender, and no
     one else but moderators (InteractionService's directed message is the relay property
     for chat; the WebRTC signaling relay is proven on MediaService in
     test_media_signaling_props.py)
  19 every timer event of a room reaches every participant with the same, correct state
  20 every timer event writes one session log row (user, room, time, action)
  35 an event of one room never reaches a participant of another room (breakout rooms of
     one session, and study rooms)
  36 every room event reaches every participant of the room, in seq order, exactly once
     (the 100 ms figure is a benchmark: bench/bench_fanout_chat.py)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from classmesh.interaction.v1 import interaction_pb2
from classmesh.session.v1 import session_pb2
from classmesh_sdk import NO_RETRY, ClassMeshClient, ClassMeshError, InvalidArgumentError
from tests.support.classroom import (
    Code,
    Feed,
    Klass,
    Mesh,
    add_student,
    classroom_mesh,
    kind,
    live_class,
    open_breakout_room,
    scope,
)

IX = interaction_pb2
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INTERACTION = (
    "chat_message_posted",
    "hand_raised",
    "hand_lowered",
    "question_asked",
    "timer_started",
    "timer_reset",
)


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    extra = {
        "CLASSMESH_RATE_LIMIT_PER_MINUTE": "0",
        "CLASSMESH_CHAT_MESSAGES_PER_MINUTE": "100000",
        "CLASSMESH_HAND_RAISES_PER_MINUTE": "100000",
        "CLASSMESH_QUESTIONS_PER_MINUTE": "100000",
    }
    async with classroom_mesh(
        admin_database_url, redis_url, tmp_path_factory, "ixprops", extra
    ) as m:
        yield m


@pytest.fixture(scope="module")
async def klass(mesh: Mesh) -> Klass:
    return await live_class(mesh, students=1)


async def _refusal(call: Any) -> ClassMeshError | None:
    try:
        await call
    except ClassMeshError as exc:
        return exc
    return None


async def _stored(mesh: Mesh, session_id: str) -> int:
    return int(
        await mesh.pool.fetchval(
            "SELECT count(*) FROM chat_messages WHERE session_id = $1::uuid", session_id
        )
    )


# ----------------------------------------------------------------------- 12, 13, 14

_blank = st.text(alphabet=" \t\r\n\u00a0\u2003", max_size=40)
_long = st.integers(1001, 3000).flatmap(
    lambda n: st.text(alphabet="abcdefghij xyz\u00e9\U0001f600", min_size=n, max_size=n).filter(
        lambda t: len(t.strip()) > 1000
    )
)


@FAST
@given(text=st.one_of(_blank, _long))
async def test_property_12_empty_or_too_long_is_refused(
    mesh: Mesh, klass: Klass, text: str
) -> None:
    (student,) = klass.students.values()
    before = await _stored(mesh, klass.id)
    err = await _refusal(
        student.interaction.send_chat_message(scope=scope(klass.id), text=text, retry=NO_RETRY)
    )
    assert err is not None and (err.code, err.reason) == (
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    assert [f for f, _ in err.field_violations] == ["text"]
    assert await _stored(mesh, klass.id) == before


_plain = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc", "Cf", "Zl", "Zp"), blacklist_characters="<>"
    ),
    min_size=1,
    max_size=1000,
).filter(lambda t: t.strip() != "" and "on" not in t.lower() and ":" not in t)


@FAST
@given(
    text=_plain,
    type_=st.sampled_from(
        [IX.CHAT_MESSAGE_TYPE_UNSPECIFIED, IX.CHAT_MESSAGE_TYPE_TEXT, IX.CHAT_MESSAGE_TYPE_EMOJI]
    ),
)
async def test_property_13_14_valid_messages_are_stored_with_every_field(
    mesh: Mesh, klass: Klass, text: str, type_: int
) -> None:
    ((user, student),) = klass.students.items()
    sent = (
        await student.interaction.send_chat_message(
            scope=scope(klass.id), text=text, type=type_, retry=NO_RETRY
        )
    ).message
    row = await mesh.pool.fetchrow(
        "SELECT user_id, session_id, breakout_room_id, body, message_type::text AS t, sent_at, "
        "seq FROM chat_messages WHERE id = $1::uuid",
        sent.id,
    )
    assert row is not None
    assert row["user_id"] == user and str(row["session_id"]) == klass.id
    assert row["breakout_room_id"] is None
    assert row["body"] == text.strip() == sent.text
    want = "emoji" if type_ == IX.CHAT_MESSAGE_TYPE_EMOJI else "text"
    assert row["t"] == want
    assert sent.type == (
        IX.CHAT_MESSAGE_TYPE_EMOJI if want == "emoji" else IX.CHAT_MESSAGE_TYPE_TEXT
    )
    assert row["sent_at"] == sent.send_time.ToDatetime().replace(tzinfo=row["sent_at"].tzinfo)
    assert row["seq"] == sent.seq > 0


async def test_property_14_poll_messages_are_a_moderators(mesh: Mesh, klass: Klass) -> None:
    (student,) = klass.students.values()
    poll = await klass.inst.interaction.send_chat_message(
        scope=scope(klass.id), text="Poll: 2 + 2?", type=IX.CHAT_MESSAGE_TYPE_POLL
    )
    t = await mesh.pool.fetchval(
        "SELECT message_type::text FROM chat_messages WHERE id = $1::uuid", poll.message.id
    )
    assert (t, poll.message.type) == ("poll", IX.CHAT_MESSAGE_TYPE_POLL)
    err = await _refusal(
        student.interaction.send_chat_message(
            scope=scope(klass.id), text="poll", type=IX.CHAT_MESSAGE_TYPE_POLL
        )
    )
    assert err is not None and (err.code, err.reason) == (
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )


# ----------------------------------------------------------------------------- 15


def _spelled(word: str) -> st.SearchStrategy[str]:
    """`word` in random case with random whitespace between its letters."""
    return st.lists(
        st.tuples(st.booleans(), st.sampled_from(["", "", "", " ", "\t", "\n"])),
        min_size=len(word),
        max_size=len(word),
    ).map(
        lambda xs: "".join(
            (c.upper() if up else c) + sp for c, (up, sp) in zip(word, xs, strict=True)
        )
    )


_attack = st.one_of(
    _spelled("javascript").map(lambda w: w + ":alert(1)"),
    st.sampled_from(["onerror", "onload", "onclick", "OnMouseOver"]).flatmap(
        lambda h: st.sampled_from(["=", " =", "  = "]).map(lambda eq: f"{h}{eq}steal()")
    ),
    st.sampled_from(["script", "SCRIPT", "ScRiPt"]).map(lambda t: f"<{t}>alert(1)</{t}>"),
    st.sampled_from(['<img src=x onerror="alert(1)">', "<svg onload=alert(1)>", "<b>bold</b>"]),
)
_filler = st.text(alphabet="abc XYZ.,!?-", max_size=20)


@FAST
@given(parts=st.lists(st.tuples(_filler, _attack), min_size=1, max_size=4), tail=_filler)
async def test_property_15_xss_never_survives(
    mesh: Mesh, klass: Klass, parts: list[tuple[str, str]], tail: str
) -> None:
    (student,) = klass.students.values()
    text = "".join(a + b for a, b in parts) + tail + " end"
    try:
        sent = (
            await student.interaction.send_chat_message(
                scope=scope(klass.id), text=text, retry=NO_RETRY
            )
        ).message
    except InvalidArgumentError as err:
        # An unclosed script-capable element (e.g. `<svg onload=...>`) swallows the rest of
        # the text; a message with nothing readable left is refused, never stored.
        assert [f for f, _ in err.field_violations] == ["text"], err
        return
    stored = await mesh.pool.fetchval("SELECT body FROM chat_messages WHERE id = $1::uuid", sent.id)
    logged = await mesh.pool.fetchval(
        "SELECT payload->'message'->>'text' FROM session_events "
        "WHERE session_id = $1::uuid AND seq = $2",
        klass.id,
        sent.seq,
    )
    assert stored == sent.text == logged
    squashed = "".join(stored.lower().split())
    for bad in ("<script", "javascript:", "onerror=", "onload=", "onclick=", "onmouseover=", "<"):
        assert bad not in squashed, (text, stored)


# ----------------------------------------------------------------------------- 16


_pairs = st.integers(3, 4).flatmap(
    lambda n: st.permutations(list(range(n))).map(lambda p: (n, p[0], p[1]))
)


@SLOW
@given(
    pair=_pairs,
    text=st.text(alphabet="abcdefgh ", min_size=1, max_size=30).filter(lambda t: t.strip()),
)
async def test_property_16_directed_messages_reach_the_recipient_with_the_sender(
    mesh: Mesh, pair: tuple[int, int, int], text: str
) -> None:
    n, i, j = pair
    settings_ = session_pb2.SessionSettings(
        lobby_enabled=False, chat_enabled=True, private_chat_enabled=True
    )
    k = await live_class(mesh, students=n, settings=settings_)
    users = list(k.students)
    src, dst = users[i], users[j]
    feeds = {u: Feed(c, k.id) for u, c in k.students.items()}
    sent = await k.students[src].interaction.send_chat_message(
        scope=scope(k.id), text=text, recipient_user_id=dst
    )
    marker = await k.students[src].interaction.send_chat_message(scope=scope(k.id), text="marker")
    for user, feed in feeds.items():
        await feed.wait_for(
            lambda e: (
                kind(e) == "chat_message_posted"
                and e.chat_message_posted.message.id == marker.message.id
            )
        )
        got = [
            e.chat_message_posted.message
            for e in feed.of("chat_message_posted")
            if e.chat_message_posted.message.id == sent.message.id
        ]
        if user in (src, dst):
            assert len(got) == 1
            assert got[0].sender.user_id == src and got[0].recipient_user_id == dst
            assert got[0].text == text.strip()
        else:
            assert got == []
        await feed.stop()


# ----------------------------------------------------------------------------- 19, 20

_TIMER_ACTIONS = ("start", "pause", "resume", "complete", "reset")
_ALLOWED = {
    "start": {"idle", "completed"},
    "pause": {"running"},
    "resume": {"paused"},
    "complete": {"running", "paused"},
    "reset": {"idle", "running", "paused", "completed"},
}
_NEXT = {
    "start": "running",
    "pause": "paused",
    "resume": "running",
    "complete": "completed",
    "reset": "idle",
}
_EVENT = {
    "start": "timer_started",
    "pause": "timer_paused",
    "resume": "timer_resumed",
    "complete": "timer_completed",
    "reset": "timer_reset",
}
_STATUS = {
    "idle": IX.TIMER_STATUS_IDLE,
    "running": IX.TIMER_STATUS_RUNNING,
    "paused": IX.TIMER_STATUS_PAUSED,
    "completed": IX.TIMER_STATUS_COMPLETED,
}
_LOG = {
    "start": "started",
    "pause": "paused",
    "resume": "resumed",
    "complete": "completed",
    "reset": "reset",
}


async def _study_room(mesh: Mesh, members: int) -> Klass:
    room = await live_class(mesh, kind=session_pb2.SESSION_KIND_STUDY_ROOM, capacity=50)
    for _ in range(members):
        await add_student(mesh, room)
    return room


@SLOW
@given(
    members=st.integers(2, 4),
    steps=st.lists(
        st.tuples(st.sampled_from(_TIMER_ACTIONS), st.integers(0, 3)), min_size=1, max_size=7
    ),
)
async def test_property_19_20_timer_events_reach_everyone_and_are_logged(
    mesh: Mesh, members: int, steps: list[tuple[str, int]]
) -> None:
    room = await _study_room(mesh, members)
    users = list(room.students)
    feeds = [Feed(room.students[u], room.id) for u in users]
    state = "idle"
    done: list[tuple[str, str]] = []  # (action, user) that succeeded
    for action, who in steps:
        user = users[who % members]
        client: ClassMeshClient = room.students[user]
        call = getattr(client.interaction, f"{action}_timer")(scope=scope(room.id), retry=NO_RETRY)
        err = await _refusal(call)
        if state in _ALLOWED[action]:
            assert err is None, (action, state, err)
            state = _NEXT[action]
            done.append((action, user))
        else:
            assert err is not None and (err.code, err.reason) == (
                Code.FAILED_PRECONDITION,
                "TIMER_STATE_INVALID",
            ), (action, state, err)
    timer = (await room.inst.interaction.get_timer(scope=scope(room.id))).timer
    assert timer.status == _STATUS[state]
    # 19: everyone got every event, with one identical state per event, in order
    timer_types = tuple(_EVENT.values())
    seen = []
    for feed in feeds:
        for action in set(a for a, _ in done):
            await feed.wait_count(_EVENT[action], sum(1 for a, _ in done if a == action))
        got = feed.of(*timer_types)
        assert [kind(e) for e in got] == [_EVENT[a] for a, _ in done]
        assert [e.actor.user_id for e in got] == [u for _, u in done]
        seen.append([(e.seq, getattr(e, kind(e)).timer.SerializeToString()) for e in got])
        await feed.stop()
    assert all(s == seen[0] for s in seen)
    if done:
        last = getattr(feeds[0].of(*timer_types)[-1], _EVENT[done[-1][0]]).timer
        assert last.status == _STATUS[state]
    # 20: one log row per timer event, with user, room and time
    rows = await mesh.pool.fetch(
        "SELECT user_id, session_id, detail, joined_at FROM session_logs "
        "WHERE session_id = $1::uuid AND kind = 'timer' ORDER BY joined_at, created_at",
        room.id,
    )
    assert [(r["detail"], r["user_id"]) for r in rows] == [(_LOG[a], u) for a, u in done]
    assert all(str(r["session_id"]) == room.id and r["joined_at"] is not None for r in rows)


# ----------------------------------------------------------------------------- 35, 36


async def _act(
    k: Klass, actor: ClassMeshClient, where: Any, what: str, n: int, hands: set[Any]
) -> None:
    if what == "chat":
        await actor.interaction.send_chat_message(scope=where, text=f"m{n}")
    elif what == "hand":
        key = (where.breakout_room_id, id(actor))
        if key in hands:
            hands.discard(key)
            await actor.interaction.lower_hand(scope=where)
        else:
            hands.add(key)
            await actor.interaction.raise_hand(scope=where)
    elif what == "question":
        await actor.interaction.ask_question(
            scope=where, text=f"question {n} {uuid.uuid4().hex[:6]}"
        )
    else:  # the teacher toggles the room's timer
        timer = (await k.inst.interaction.get_timer(scope=where)).timer
        if timer.status == IX.TIMER_STATUS_RUNNING:
            await k.inst.interaction.reset_timer(scope=where)
        else:
            await k.inst.interaction.start_timer(scope=where)


@SLOW
@given(
    actions=st.lists(
        st.tuples(st.integers(0, 2), st.sampled_from(["chat", "hand", "question", "timer"])),
        min_size=1,
        max_size=8,
    )
)
async def test_property_35_36_breakout_rooms_are_isolated_and_complete(
    mesh: Mesh, actions: list[tuple[int, str]]
) -> None:
    k = await live_class(mesh, students=5)
    u = list(k.students)
    room1 = await open_breakout_room(mesh, k.id, u[1:3])
    room2 = await open_breakout_room(mesh, k.id, u[3:5])
    rooms = ["", room1, room2]
    members = {0: [u[0]], 1: u[1:3], 2: u[3:5]}
    # every participant follows the room they are in; the teacher follows all three
    feeds = {
        user: (r, Feed(k.students[user], k.id, rooms[r]))
        for r, us in members.items()
        for user in us
    }
    teacher = {r: Feed(k.inst, k.id, rooms[r]) for r in range(3)}
    expected = {0: 0, 1: 0, 2: 0}
    hands: set[Any] = set()
    for n, (r, what) in enumerate(actions):
        actor = k.students[members[r][n % len(members[r])]]
        await _act(k, actor, scope(k.id, rooms[r]), what, n, hands)
        expected[r] += 1
    for _user, (r, feed) in feeds.items():
        await _until(feed, expected[r])
    for r, feed in teacher.items():
        await _until(feed, expected[r])
    await asyncio.sleep(0.3)  # anything leaking would have arrived by now
    for user, (r, feed) in [*feeds.items(), *(("teacher", (r, f)) for r, f in teacher.items())]:
        got = [e for e in feed.events if kind(e) in INTERACTION]
        # 35: only the own room's events; 36: all of them, once each, in order
        assert {e.breakout_room_id for e in got} <= {rooms[r]}, (user, r)
        assert len(got) == expected[r], (user, r, [kind(e) for e in got])
        seqs = [e.seq for e in got]
        assert seqs == sorted(set(seqs))
        await feed.stop()
    # the members of one room saw exactly the same sequence
    for us in members.values():
        views = [[e.seq for e in feeds[x][1].events if kind(e) in INTERACTION] for x in us]
        assert all(v == views[0] for v in views)


async def _until(feed: Feed, n: int, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while sum(1 for e in feed.events if kind(e) in INTERACTION) < n:
        assert loop.time() < deadline, f"{n} events expected, got {[kind(e) for e in feed.events]}"
        assert not feed.ended, feed.error
        await asyncio.sleep(0.02)


@SLOW
@given(rooms=st.integers(2, 3), texts=st.lists(st.integers(0, 2), min_size=1, max_size=6))
async def test_property_35_study_rooms_are_isolated(
    mesh: Mesh, rooms: int, texts: list[int]
) -> None:
    study = [await _study_room(mesh, 2) for _ in range(rooms)]
    feeds = [[Feed(c, s.id) for c in s.students.values()] for s in study]
    expected = [0] * rooms
    for n, i in enumerate(texts):
        s = study[i % rooms]
        sender = list(s.students.values())[n % 2]
        await sender.interaction.send_chat_message(scope=scope(s.id), text=f"room {i % rooms} #{n}")
        expected[i % rooms] += 1
    for i, group in enumerate(feeds):
        for feed in group:
            await _until(feed, expected[i])
    await asyncio.sleep(0.3)
    for i, group in enumerate(feeds):
        for feed in group:
            got = feed.of("chat_message_posted")
            assert len(got) == expected[i]
            assert {e.session_id for e in got} <= {study[i].id}
            assert all(e.chat_message_posted.message.text.startswith(f"room {i} ") for e in got)
            await feed.stop()
