"""Chat and hand raise end to end (seed 000 STR-018..022) through the SDK against a real
`classmesh up`: history in order, live delivery, moderator delete, private messages,
XSS neutralisation, breakout scopes, retention, the hand-raise queue."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from classmesh.interaction.v1 import interaction_pb2
from tests.support.classroom import (
    Code,
    Feed,
    Mesh,
    classroom_mesh,
    expect_error,
    kind,
    live_class,
    scope,
)

IX = interaction_pb2


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with classroom_mesh(admin_database_url, redis_url, tmp_path_factory, "chat") as m:
        yield m


async def test_str022_chat_history_and_hand_queue(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=3)
    sid = klass.id
    users = list(klass.students)
    feed = Feed(klass.students[users[0]], sid)
    await feed.ready()

    sent = []
    for i in range(10):
        sender = klass.students[users[i % 3]] if i % 2 else klass.inst
        resp = await sender.interaction.send_chat_message(scope=scope(sid), text=f"message {i}")
        sent.append(resp.message)
    history = (await klass.inst.interaction.list_chat_messages(scope=scope(sid))).messages
    assert [m.text for m in reversed(history)] == [f"message {i}" for i in range(10)]
    assert [m.id for m in reversed(history)] == [m.id for m in sent]
    seqs = [m.seq for m in reversed(history)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 10
    live = await feed.wait_count("chat_message_posted", 10)
    assert [e.chat_message_posted.message.text for e in live] == [f"message {i}" for i in range(10)]
    assert [e.seq for e in live] == seqs

    raised = []
    for user in users:
        hand = (await klass.students[user].interaction.raise_hand(scope=scope(sid))).hand_raise
        raised.append(hand)
    assert [h.position for h in raised] == [1, 2, 3]
    queue = await klass.inst.interaction.list_raised_hands(scope=scope(sid))
    assert [h.raiser.user_id for h in queue.hand_raises] == users
    assert queue.active_count == 3
    first_two = await klass.inst.interaction.list_raised_hands(scope=scope(sid), page_size=2)
    last = await klass.inst.interaction.list_raised_hands(
        scope=scope(sid), page_size=2, page_token=first_two.next_page_token
    )
    assert [h.raiser.user_id for h in [*first_two.hand_raises, *last.hand_raises]] == users
    assert [h.position for h in last.hand_raises] == [3]
    ack = await klass.inst.interaction.acknowledge_hand(
        session_id=sid, hand_raise_id=queue.hand_raises[0].id
    )
    assert ack.hand_raise.status == IX.HAND_RAISE_STATUS_ACKNOWLEDGED
    assert ack.hand_raise.acknowledged_by.user_id == klass.teacher
    queue = await klass.inst.interaction.list_raised_hands(scope=scope(sid))
    assert [h.raiser.user_id for h in queue.hand_raises] == users[1:]
    assert [h.position for h in queue.hand_raises] == [1, 2]
    await feed.wait_count("hand_raised", 3)
    got = await feed.wait_count("hand_acknowledged", 1)
    assert got[0].hand_acknowledged.hand_raise.raiser.user_id == users[0]
    await feed.stop()


async def test_history_pages_newest_first_with_cursors(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    sid = klass.id
    for i in range(7):
        await klass.inst.interaction.send_chat_message(scope=scope(sid), text=f"m{i}")
    page1 = await klass.inst.interaction.list_chat_messages(scope=scope(sid), page_size=3)
    assert [m.text for m in page1.messages] == ["m6", "m5", "m4"]
    page2 = await klass.inst.interaction.list_chat_messages(
        scope=scope(sid), page_size=3, page_token=page1.next_page_token
    )
    assert [m.text for m in page2.messages] == ["m3", "m2", "m1"]
    page3 = await klass.inst.interaction.list_chat_messages(
        scope=scope(sid), page_size=3, page_token=page2.next_page_token
    )
    assert [m.text for m in page3.messages] == ["m0"] and not page3.next_page_token
    # time cursors: strictly after the send time of m4
    after = page1.messages[2].send_time
    newer = await klass.inst.interaction.list_chat_messages(scope=scope(sid), after_time=after)
    assert [m.text for m in newer.messages] == ["m6", "m5"]
    older = await klass.inst.interaction.list_chat_messages(scope=scope(sid), before_time=after)
    assert [m.text for m in older.messages] == ["m3", "m2", "m1", "m0"]
    await expect_error(
        klass.inst.interaction.list_chat_messages(scope=scope(sid), page_token="garbage!"),
        Code.INVALID_ARGUMENT,
        "PAGE_TOKEN_INVALID",
    )


async def test_moderator_deletes_and_history_hides_it(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    sid = klass.id
    ((student_id, student),) = klass.students.items()
    feed = Feed(student, sid)
    msg = (await student.interaction.send_chat_message(scope=scope(sid), text="oops")).message
    await expect_error(
        student.interaction.delete_chat_message(session_id=sid, message_id=msg.id),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    gone = await klass.inst.interaction.delete_chat_message(
        session_id=sid, message_id=msg.id, reason="off-topic"
    )
    assert gone.message.deleted and gone.message.text == ""
    deleted = await feed.wait_for(lambda e: kind(e) == "chat_message_deleted")
    assert deleted.chat_message_deleted.message_id == msg.id
    assert deleted.chat_message_deleted.reason == "off-topic"
    assert (await student.interaction.list_chat_messages(scope=scope(sid))).messages == []
    tombstones = await klass.inst.interaction.list_chat_messages(
        scope=scope(sid), include_deleted=True
    )
    assert [(m.id, m.deleted, m.text) for m in tombstones.messages] == [(msg.id, True, "")]
    await expect_error(
        student.interaction.list_chat_messages(scope=scope(sid), include_deleted=True),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    audit = await mesh.pool.fetch(
        "SELECT action, target_id, reason, actor_id FROM audit_logs WHERE target_id = $1", msg.id
    )
    assert [(a["action"], a["reason"], a["actor_id"]) for a in audit] == [
        ("chat_message_deleted", "off-topic", klass.teacher)
    ]
    row = await mesh.pool.fetchrow(
        "SELECT deleted_at, deleted_by FROM chat_messages WHERE id = $1::uuid", msg.id
    )
    assert row["deleted_at"] is not None and row["deleted_by"] == klass.teacher
    # a replay of the log shows that a message was posted, never its text
    replay = Feed(klass.inst, sid)
    posted = await replay.wait_for(
        lambda e: kind(e) == "chat_message_posted" and e.chat_message_posted.message.id == msg.id
    )
    assert posted.chat_message_posted.message.text == ""
    assert posted.chat_message_posted.message.deleted
    await replay.stop()
    await expect_error(
        klass.inst.interaction.delete_chat_message(
            session_id=sid, message_id="00000000-0000-4000-8000-000000000000"
        ),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )
    await feed.stop()
    assert student_id


XSS = [
    "<script>alert(document.cookie)</script>hello",
    '<img src=x onerror="alert(1)">look',
    '<a href="javascript:alert(1)">click</a> me',
    "JaVaScRiPt:alert(1)",
    "java\tscript:alert(2) and ONERROR = steal()",
    "<svg/onload=alert(1)></svg>svg",
    "<<script>script>alert(1)<</script>/script>tail",
    "<iframe src=//evil></iframe>frame",
    "x onmouseover=alert(1) y",
    "a < b and c > d",
]


async def test_xss_is_neutralised_in_what_is_stored_and_sent(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    sid = klass.id
    (student,) = klass.students.values()
    feed = Feed(klass.inst, sid)
    replies = []
    for text in XSS:
        replies.append(
            (await student.interaction.send_chat_message(scope=scope(sid), text=text)).message
        )
    live = await feed.wait_count("chat_message_posted", len(XSS))
    rows = await mesh.pool.fetch(
        "SELECT body FROM chat_messages WHERE session_id = $1::uuid ORDER BY seq", sid
    )
    logged = await mesh.pool.fetch(
        "SELECT payload->'message'->>'text' AS text FROM session_events "
        "WHERE session_id = $1::uuid AND type = 'chat_message_posted' ORDER BY seq",
        sid,
    )
    stored = [r["body"] for r in rows]
    sent = [e.chat_message_posted.message.text for e in live]
    answered = [m.text for m in replies]
    assert stored == sent == answered == [r["text"] for r in logged]
    for text in stored:
        low = text.lower()
        for bad in (
            "<script",
            "javascript:",
            "onerror=",
            "onload=",
            "onmouseover=",
            "<iframe",
            "<",
        ):
            assert bad not in low.replace(" ", "").replace("\t", ""), (bad, text)
    assert stored[0] == "hello" and stored[1] == "look" and stored[7] == "frame"
    assert stored[9] == "a \uff1c b and c \uff1e d"  # plain comparisons survive, inert
    # markup only: nothing left to send
    await expect_error(
        student.interaction.send_chat_message(scope=scope(sid), text="<script>x</script>"),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    await feed.stop()


async def test_chat_validation_and_who_may_chat(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    sid = klass.id
    (student,) = klass.students.values()
    for text in ("", "   \n\t ", "x" * 1001):
        err = await expect_error(
            student.interaction.send_chat_message(scope=scope(sid), text=text),
            Code.INVALID_ARGUMENT,
            "VALIDATION_FAILED",
        )
        assert [f for f, _ in err.field_violations] == ["text"]
    ok = await student.interaction.send_chat_message(scope=scope(sid), text="  " + "y" * 1000 + " ")
    assert ok.message.text == "y" * 1000
    err = await expect_error(
        student.interaction.send_chat_message(
            scope=scope(sid), text="hi", type=IX.CHAT_MESSAGE_TYPE_SYSTEM
        ),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    assert [f for f, _ in err.field_violations] == ["type"]
    await expect_error(
        student.interaction.send_chat_message(
            scope=scope(sid), text="vote!", type=IX.CHAT_MESSAGE_TYPE_POLL
        ),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    emoji = await student.interaction.send_chat_message(
        scope=scope(sid), text="\U0001f44d\U0001f3fd", type=IX.CHAT_MESSAGE_TYPE_EMOJI
    )
    assert emoji.message.type == IX.CHAT_MESSAGE_TYPE_EMOJI
    poll = await klass.inst.interaction.send_chat_message(
        scope=scope(sid), text="Poll is open", type=IX.CHAT_MESSAGE_TYPE_POLL
    )
    assert poll.message.type == IX.CHAT_MESSAGE_TYPE_POLL
    # never joined: not a participant
    outsider = mesh.client("outsider-1")
    await expect_error(
        outsider.interaction.send_chat_message(scope=scope(sid), text="hi"),
        Code.PERMISSION_DENIED,
        "NOT_IN_SESSION",
    )
    await expect_error(
        student.interaction.send_chat_message(
            scope=scope("00000000-0000-4000-8000-000000000000"), text="hi"
        ),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )
    # a chat-muted participant (SessionService's permissions) cannot post
    user = next(iter(klass.students))
    await mesh.pool.execute(
        "UPDATE session_participants SET chat_muted = true "
        "WHERE session_id = $1::uuid AND user_id = $2",
        sid,
        user,
    )
    await expect_error(
        student.interaction.send_chat_message(scope=scope(sid), text="hi"),
        Code.FAILED_PRECONDITION,
        "CHAT_DISABLED",
    )
    # after the class ends nobody chats
    await klass.inst.sessions.end_session(session_id=sid)
    await expect_error(
        klass.inst.interaction.send_chat_message(scope=scope(sid), text="bye"),
        Code.FAILED_PRECONDITION,
        "SESSION_ENDED",
    )


async def test_private_messages_reach_sender_recipient_and_moderators_only(mesh: Mesh) -> None:
    from classmesh.session.v1 import session_pb2

    settings = session_pb2.SessionSettings(
        lobby_enabled=False, chat_enabled=True, private_chat_enabled=True
    )
    klass = await live_class(mesh, students=3, settings=settings)
    sid = klass.id
    a, b, c = klass.students
    feeds = {u: Feed(cl, sid) for u, cl in klass.students.items()}
    feeds["teacher"] = Feed(klass.inst, sid)
    dm = await klass.students[a].interaction.send_chat_message(
        scope=scope(sid), text="psst", recipient_user_id=b
    )
    assert dm.message.recipient_user_id == b and dm.message.sender.user_id == a
    public = await klass.students[a].interaction.send_chat_message(scope=scope(sid), text="all")
    for user in (a, b, "teacher"):
        got = await feeds[user].wait_count("chat_message_posted", 2)
        assert [e.chat_message_posted.message.text for e in got] == ["psst", "all"]
        assert got[0].chat_message_posted.message.sender.user_id == a
    got = await feeds[c].wait_count("chat_message_posted", 1)
    await feeds[c].quiet()
    assert [e.chat_message_posted.message.text for e in feeds[c].of("chat_message_posted")] == [
        "all"
    ]
    assert got[0].chat_message_posted.message.id == public.message.id
    hist_c = await klass.students[c].interaction.list_chat_messages(scope=scope(sid))
    assert [m.text for m in hist_c.messages] == ["all"]
    hist_b = await klass.students[b].interaction.list_chat_messages(scope=scope(sid))
    assert [m.text for m in hist_b.messages] == ["all", "psst"]
    await expect_error(
        klass.students[a].interaction.send_chat_message(
            scope=scope(sid), text="me", recipient_user_id=a
        ),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    await expect_error(
        klass.students[a].interaction.send_chat_message(
            scope=scope(sid), text="ghost", recipient_user_id="nobody-here"
        ),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )
    for f in feeds.values():
        await f.stop()


async def test_private_chat_off_by_default(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=2)
    a, b = klass.students
    await expect_error(
        klass.students[a].interaction.send_chat_message(
            scope=scope(klass.id), text="psst", recipient_user_id=b
        ),
        Code.FAILED_PRECONDITION,
        "FEATURE_DISABLED",
    )
    # moderators always may
    sent = await klass.inst.interaction.send_chat_message(
        scope=scope(klass.id), text="see me after class", recipient_user_id=b
    )
    assert sent.message.recipient_user_id == b


async def test_retention_run_deletes_old_chat(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    sid = klass.id
    old = (await klass.inst.interaction.send_chat_message(scope=scope(sid), text="ancient")).message
    new = (await klass.inst.interaction.send_chat_message(scope=scope(sid), text="fresh")).message
    await mesh.pool.execute(
        "UPDATE chat_messages SET sent_at = now() - interval '91 days' WHERE id = $1::uuid", old.id
    )
    await mesh.pool.execute(
        "UPDATE session_events SET created_at = now() - interval '91 days' "
        "WHERE session_id = $1::uuid AND seq = $2",
        sid,
        old.seq,
    )
    rc, out, err = await mesh.cli("retention", "run")
    assert rc == 0, err
    assert "chat_messages_deleted: 1" in out.splitlines()
    left = await klass.inst.interaction.list_chat_messages(scope=scope(sid))
    assert [m.id for m in left.messages] == [new.id]
    payload = await mesh.pool.fetchval(
        "SELECT payload FROM session_events WHERE session_id = $1::uuid AND seq = $2", sid, old.seq
    )
    assert "ancient" not in payload
    # a shorter window from the command line
    rc, out, err = await mesh.cli("retention", "run", "--chat-days", "1")
    assert rc == 0 and "chat_messages_deleted: 0" in out.splitlines(), (out, err)


async def test_hand_raise_is_idempotent_lower_and_dismiss(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=2)
    sid = klass.id
    a, b = klass.students
    first = (await klass.students[a].interaction.raise_hand(scope=scope(sid))).hand_raise
    again = (await klass.students[a].interaction.raise_hand(scope=scope(sid))).hand_raise
    assert again.id == first.id and again.status == IX.HAND_RAISE_STATUS_ACTIVE
    count = await mesh.pool.fetchval(
        "SELECT count(*) FROM hand_raises WHERE session_id = $1::uuid AND user_id = $2", sid, a
    )
    assert count == 1
    lowered = (await klass.students[a].interaction.lower_hand(scope=scope(sid))).hand_raise
    assert lowered.id == first.id and lowered.status == IX.HAND_RAISE_STATUS_LOWERED
    await expect_error(
        klass.students[a].interaction.lower_hand(scope=scope(sid)),
        Code.FAILED_PRECONDITION,
        "HAND_NOT_RAISED",
    )
    second = (await klass.students[a].interaction.raise_hand(scope=scope(sid))).hand_raise
    assert second.id != first.id and second.position == 1
    await expect_error(
        klass.students[b].interaction.lower_hand(scope=scope(sid), user_id=a),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    dismissed = (await klass.inst.interaction.lower_hand(scope=scope(sid), user_id=a)).hand_raise
    assert dismissed.status == IX.HAND_RAISE_STATUS_DISMISSED
    assert dismissed.acknowledged_by.user_id == klass.teacher
    await expect_error(
        klass.inst.interaction.acknowledge_hand(session_id=sid, hand_raise_id=dismissed.id),
        Code.FAILED_PRECONDITION,
        "HAND_NOT_RAISED",
    )
    everything = await klass.inst.interaction.list_raised_hands(
        scope=scope(sid), include_inactive=True
    )
    assert [h.status for h in everything.hand_raises] == [
        IX.HAND_RAISE_STATUS_LOWERED,
        IX.HAND_RAISE_STATUS_DISMISSED,
    ]
    assert everything.active_count == 0
    await expect_error(
        klass.students[b].interaction.acknowledge_hand(session_id=sid, hand_raise_id=first.id),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
