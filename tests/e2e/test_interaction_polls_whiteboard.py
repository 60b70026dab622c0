"""Polls and whiteboard end to end (seed 000 STR-028..031): STR-031's scenario, results pushed
live to every subscriber after each answer, closed polls, option checks, auto-close, delta
updates with versions and conflicts, the 10 MB limit, late joiners catching up."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from google.protobuf import duration_pb2

from classmesh.interaction.v1 import interaction_pb2
from classmesh.session.v1 import session_pb2
from tests.support.classroom import (
    Code,
    Feed,
    Mesh,
    classroom_mesh,
    db_events,
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
    extra = {"CLASSMESH_INTERACTION_SWEEP_INTERVAL_SECONDS": "0.2"}
    async with classroom_mesh(admin_database_url, redis_url, tmp_path_factory, "polls", extra) as m:
        yield m


def stroke(points: int = 3, x: float = 0.0) -> IX.WhiteboardElement:
    return IX.WhiteboardElement(
        id=str(uuid.uuid4()),
        kind=IX.WHITEBOARD_ELEMENT_KIND_STROKE,
        tool="pen",
        color="#112233",
        stroke_width=2.0,
        points=[IX.WhiteboardPoint(x=x + i, y=i * 0.5, pressure=0.5) for i in range(points)],
    )


def add(el: IX.WhiteboardElement) -> IX.WhiteboardOp:
    return IX.WhiteboardOp(add=el)


async def test_str031_whiteboard_sync_and_poll_aggregation(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=5)
    sid = klass.id
    users = list(klass.students)
    feeds = {u: Feed(c, sid) for u, c in klass.students.items()}

    # instructor draws; every student receives whiteboard_updated with the stroke delta
    line = stroke(4)
    upd = await klass.inst.interaction.update_whiteboard(
        scope=scope(sid), base_version=0, ops=[add(line)]
    )
    assert upd.version == 1 and upd.size_bytes > 0
    for user in users:
        got = await feeds[user].wait_for(lambda e: kind(e) == "whiteboard_updated")
        ops = got.whiteboard_updated.ops
        assert got.whiteboard_updated.version == 1
        assert [o.add.id for o in ops] == [line.id]
        assert ops[0].add.author_user_id == klass.teacher
        assert [p.x for p in ops[0].add.points] == [0.0, 1.0, 2.0, 3.0]

    # instructor creates a poll, 5 students respond: results aggregate
    poll = (
        await klass.inst.interaction.create_poll(
            scope=scope(sid),
            question="Best sorting algorithm?",
            options=["quick", "merge", "heap"],
            show_results_live=True,
        )
    ).poll
    assert poll.status == IX.POLL_STATUS_OPEN and len(poll.options) == 3
    picks = [0, 1, 1, 2, 1]
    for i, (user, pick) in enumerate(zip(users, picks, strict=True)):
        resp = await klass.students[user].interaction.respond_to_poll(
            session_id=sid, poll_id=poll.id, option_indexes=[pick]
        )
        assert list(resp.poll.my_selection) == [pick]
        assert resp.results.respondent_count == i + 1
        # pushed to every subscriber after each answer
        for u in users:
            changed = await feeds[u].wait_count("poll_results_changed", i + 1)
            assert changed[i].poll_results_changed.results.respondent_count == i + 1
    results = (
        await klass.inst.interaction.get_poll_results(session_id=sid, poll_id=poll.id)
    ).results
    assert [o.count for o in results.options] == [1, 3, 1]
    assert results.respondent_count == 5
    assert [round(o.fraction, 2) for o in results.options] == [0.2, 0.6, 0.2]
    db = await mesh.pool.fetch(
        "SELECT user_id, selected_options FROM poll_responses WHERE poll_id = $1::uuid", poll.id
    )
    assert sorted((r["user_id"], list(r["selected_options"])) for r in db) == sorted(
        (u, [p]) for u, p in zip(users, picks, strict=True)
    )

    closed = await klass.inst.interaction.close_poll(session_id=sid, poll_id=poll.id)
    assert closed.poll.status == IX.POLL_STATUS_CLOSED
    assert [o.count for o in closed.results.options] == [1, 3, 1]
    for u in users:
        done = await feeds[u].wait_for(lambda e: kind(e) == "poll_closed")
        assert done.poll_closed.results.respondent_count == 5
    # STR-031: a student responding to a closed poll is refused (seed: 403; gRPC: not now)
    await expect_error(
        klass.students[users[0]].interaction.respond_to_poll(
            session_id=sid, poll_id=poll.id, option_indexes=[2]
        ),
        Code.FAILED_PRECONDITION,
        "POLL_CLOSED",
    )
    again = await klass.inst.interaction.close_poll(session_id=sid, poll_id=poll.id)
    assert again.poll.close_time == closed.poll.close_time  # idempotent, no second event
    types = [r["type"] for r in await db_events(mesh.pool, sid)]
    assert types.count("poll_closed") == 1 and types.count("poll_results_changed") == 5
    for f in feeds.values():
        await f.stop()


async def test_poll_rules(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=2)
    sid = klass.id
    a, b = klass.students
    await expect_error(
        klass.students[a].interaction.create_poll(
            scope=scope(sid), question="q?", options=["x", "y"]
        ),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    for options in (["only"], [f"o{i}" for i in range(11)], ["ok", "   "]):
        await expect_error(
            klass.inst.interaction.create_poll(scope=scope(sid), question="q?", options=options),
            Code.INVALID_ARGUMENT,
            "VALIDATION_FAILED",
        )
    poll = (
        await klass.inst.interaction.create_poll(
            scope=scope(sid), question="<b>Pick</b> one", options=["a", "b", "c"]
        )
    ).poll
    assert poll.question == "Pick one"
    for bad in ([3], [-1], [0, 1], [], [0, 0]):
        await expect_error(
            klass.students[a].interaction.respond_to_poll(
                session_id=sid, poll_id=poll.id, option_indexes=bad
            ),
            Code.INVALID_ARGUMENT,
            "POLL_OPTION_INVALID",
        )
    # one response per user; changing it replaces it
    first = await klass.students[a].interaction.respond_to_poll(
        session_id=sid, poll_id=poll.id, option_indexes=[0]
    )
    assert not first.HasField("results")  # results hidden from students until close
    await klass.students[a].interaction.respond_to_poll(
        session_id=sid, poll_id=poll.id, option_indexes=[2]
    )
    res = (await klass.inst.interaction.get_poll_results(session_id=sid, poll_id=poll.id)).results
    assert [o.count for o in res.options] == [0, 0, 1] and res.respondent_count == 1
    await expect_error(
        klass.students[b].interaction.get_poll_results(session_id=sid, poll_id=poll.id),
        Code.FAILED_PRECONDITION,
        "FAILED_PRECONDITION",
    )
    who = await klass.inst.interaction.get_poll_results(
        session_id=sid, poll_id=poll.id, include_respondents=True
    )
    assert [(r.user_id, list(r.option_indexes)) for r in who.results.respondents] == [(a, [2])]
    # a student's feed gets the event without the open results
    feed_b = Feed(klass.students[b], sid)
    hidden = await feed_b.wait_for(lambda e: kind(e) == "poll_results_changed")
    assert not hidden.poll_results_changed.HasField("results")
    assert list(hidden.poll_results_changed.option_indexes) == []
    feed_t = Feed(klass.inst, sid)
    shown = await feed_t.wait_for(lambda e: kind(e) == "poll_results_changed")
    assert shown.poll_results_changed.results.respondent_count == 1
    keys = {e.poll_results_changed.respondent_key for e in feed_t.of("poll_results_changed")}
    assert len(keys) == 1 and a not in next(iter(keys))  # stable, not the user id
    # multiple choice with a cap
    multi = (
        await klass.inst.interaction.create_poll(
            scope=scope(sid),
            question="Which apply?",
            options=["a", "b", "c", "d"],
            kind=IX.POLL_KIND_MULTIPLE_CHOICE,
            max_selections=2,
            anonymous=True,
        )
    ).poll
    ok = await klass.students[b].interaction.respond_to_poll(
        session_id=sid, poll_id=multi.id, option_indexes=[3, 1]
    )
    assert list(ok.poll.my_selection) == [1, 3]
    await expect_error(
        klass.students[b].interaction.respond_to_poll(
            session_id=sid, poll_id=multi.id, option_indexes=[0, 1, 2]
        ),
        Code.INVALID_ARGUMENT,
        "POLL_OPTION_INVALID",
    )
    anon = await klass.inst.interaction.get_poll_results(
        session_id=sid, poll_id=multi.id, include_respondents=True
    )
    assert list(anon.results.respondents) == []  # anonymous: not even instructors
    anon_event = await feed_t.wait_for(
        lambda e: kind(e) == "poll_results_changed" and e.poll_results_changed.poll_id == multi.id
    )
    assert (
        not anon_event.actor.user_id and list(anon_event.poll_results_changed.option_indexes) == []
    )
    listed = await klass.students[a].interaction.list_polls(scope=scope(sid))
    assert [p.id for p in listed.polls] == [multi.id, poll.id]
    assert list(listed.polls[1].my_selection) == [2]
    page = await klass.students[a].interaction.list_polls(scope=scope(sid), page_size=1)
    rest = await klass.students[a].interaction.list_polls(
        scope=scope(sid), page_size=1, page_token=page.next_page_token
    )
    assert [p.id for p in [*page.polls, *rest.polls]] == [multi.id, poll.id]
    assert not rest.next_page_token
    await klass.inst.interaction.close_poll(session_id=sid, poll_id=poll.id)
    closed = await klass.students[a].interaction.list_polls(
        scope=scope(sid), status=IX.POLL_STATUS_CLOSED
    )
    assert [p.id for p in closed.polls] == [poll.id]
    final = await klass.students[b].interaction.get_poll_results(session_id=sid, poll_id=poll.id)
    assert final.results.status == IX.POLL_STATUS_CLOSED  # students see results once closed
    await feed_b.stop()
    await feed_t.stop()


async def test_poll_auto_closes_when_its_time_is_up(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    sid = klass.id
    (student,) = klass.students.values()
    feed = Feed(student, sid)
    poll = (
        await klass.inst.interaction.create_poll(
            scope=scope(sid),
            question="Quick one",
            options=["yes", "no"],
            duration=duration_pb2.Duration(seconds=10),
        )
    ).poll
    assert poll.HasField("closes_at")
    await student.interaction.respond_to_poll(session_id=sid, poll_id=poll.id, option_indexes=[0])
    # move the deadline into the past instead of waiting 10 s
    await mesh.pool.execute(
        "UPDATE session_polls SET closes_at = created_at + interval '1 ms' WHERE id = $1::uuid",
        poll.id,
    )
    await expect_error(
        student.interaction.respond_to_poll(session_id=sid, poll_id=poll.id, option_indexes=[1]),
        Code.FAILED_PRECONDITION,
        "POLL_CLOSED",
    )
    closed = await feed.wait_for(lambda e: kind(e) == "poll_closed", timeout=10)
    assert closed.actor.kind == 2  # ACTOR_KIND_SYSTEM
    assert closed.poll_closed.results.respondent_count == 1
    got = (await student.interaction.get_poll(session_id=sid, poll_id=poll.id)).poll
    assert got.status == IX.POLL_STATUS_CLOSED
    await feed.stop()


async def test_whiteboard_deltas_versions_conflicts_and_late_joiners(mesh: Mesh) -> None:
    settings = session_pb2.SessionSettings(
        lobby_enabled=False, chat_enabled=True, students_can_draw=True
    )
    klass = await live_class(mesh, students=2, settings=settings)
    sid = klass.id
    a, b = klass.students
    ca, cb = klass.students[a], klass.students[b]
    e1, e2 = stroke(2), stroke(2, x=10)
    v1 = await ca.interaction.update_whiteboard(scope=scope(sid), base_version=0, ops=[add(e1)])
    v2 = await cb.interaction.update_whiteboard(scope=scope(sid), base_version=0, ops=[add(e2)])
    assert (v1.version, v2.version) == (1, 2)  # stale base, untouched element: applied
    changed = IX.WhiteboardElement()
    changed.CopyFrom(e1)
    changed.color = "#ff0000"
    await ca.interaction.update_whiteboard(
        scope=scope(sid), base_version=2, ops=[IX.WhiteboardOp(update=changed)]
    )
    # b still thinks version 2: its edit of e1 (changed in 3) conflicts
    err = await expect_error(
        cb.interaction.update_whiteboard(
            scope=scope(sid), base_version=2, ops=[IX.WhiteboardOp(remove_element_id=e1.id)]
        ),
        Code.ABORTED,
        "WHITEBOARD_VERSION_CONFLICT",
    )
    assert err.metadata["elementId"] == e1.id
    # a late joiner gets snapshot + seq, then follows deltas from there
    snap = await cb.interaction.get_whiteboard(scope=scope(sid))
    board = snap.whiteboard
    assert board.version == 3
    assert [el.id for el in board.elements] == [e1.id, e2.id]
    assert board.elements[0].color == "#ff0000"
    assert board.size_bytes == (
        await mesh.pool.fetchval(
            "SELECT size_bytes FROM whiteboards WHERE session_id = $1::uuid", sid
        )
    )
    follower = Feed(cb, sid, after_seq=snap.seq)
    e3 = stroke(3, x=20)
    await ca.interaction.update_whiteboard(
        scope=scope(sid),
        base_version=3,
        ops=[add(e3), IX.WhiteboardOp(remove_element_id=e2.id)],
    )
    got = await follower.wait_for(lambda e: kind(e) == "whiteboard_updated")
    assert got.whiteboard_updated.base_version == 3 and got.whiteboard_updated.version == 4
    assert not follower.of("chat_message_posted", "poll_created")
    assert [e.seq for e in follower.events][0] > snap.seq
    now_board = (await ca.interaction.get_whiteboard(scope=scope(sid))).whiteboard
    assert [el.id for el in now_board.elements] == [e1.id, e3.id]
    # clear: moderators (and drawers when students may draw)
    cleared = await klass.inst.interaction.clear_whiteboard(scope=scope(sid))
    assert cleared.whiteboard.version == 5 and list(cleared.whiteboard.elements) == []
    await follower.wait_for(lambda e: kind(e) == "whiteboard_cleared")
    assert (await ca.interaction.get_whiteboard(scope=scope(sid))).whiteboard.size_bytes == 0
    await expect_error(
        ca.interaction.update_whiteboard(scope=scope(sid), base_version=9, ops=[add(stroke())]),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    bad = stroke()
    bad.points.add(x=float("nan"), y=0)
    odd = stroke()
    odd.attributes.update({"weight": float("inf")})
    for element in (bad, odd):
        await expect_error(
            ca.interaction.update_whiteboard(scope=scope(sid), base_version=5, ops=[add(element)]),
            Code.INVALID_ARGUMENT,
            "VALIDATION_FAILED",
        )
    await follower.stop()


async def test_students_draw_only_when_allowed(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    (student,) = klass.students.values()
    await expect_error(
        student.interaction.update_whiteboard(
            scope=scope(klass.id), base_version=0, ops=[add(stroke())]
        ),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    await expect_error(
        student.interaction.clear_whiteboard(scope=scope(klass.id)),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )


async def test_whiteboard_over_10_mb_is_refused_and_changes_nothing(mesh: Mesh) -> None:
    klass = await live_class(mesh)
    sid = klass.id
    small = await klass.inst.interaction.update_whiteboard(
        scope=scope(sid), base_version=0, ops=[add(stroke(100))]
    )
    # 25 strokes of 10,000 points: about 11 MB of JSON in one update
    big = [add(stroke(10_000, x=float(i))) for i in range(25)]
    err = await expect_error(
        klass.inst.interaction.update_whiteboard(scope=scope(sid), base_version=1, ops=big),
        Code.INVALID_ARGUMENT,
        "WHITEBOARD_TOO_LARGE",
    )
    assert err.metadata["maxBytes"] == "10485760"
    board = (await klass.inst.interaction.get_whiteboard(scope=scope(sid))).whiteboard
    assert board.version == small.version and len(board.elements) == 1
    assert board.size_bytes == small.size_bytes
    # below the limit it works: 10 such strokes (about 4.5 MB)
    ok = await klass.inst.interaction.update_whiteboard(
        scope=scope(sid), base_version=1, ops=big[:10]
    )
    assert 4_000_000 < ok.size_bytes <= 10_485_760
    events = [r["type"] for r in await db_events(mesh.pool, sid)]
    assert events.count("whiteboard_updated") == 2
    await asyncio.sleep(0)
