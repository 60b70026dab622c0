"""Q&A end to end (seed 004 BACKEND-009): ask, one changeable vote per user, priority order
(pinned, score, age), answer/resolve, moderation (review queue, hide, pin, dismiss,
restore) synced live, anonymity, spam prevention."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from classmesh.interaction.v1 import interaction_pb2, interaction_service_pb2
from classmesh.session.v1 import session_pb2
from classmesh_sdk import NO_RETRY
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
RX = interaction_service_pb2


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with classroom_mesh(admin_database_url, redis_url, tmp_path_factory, "qa") as m:
        yield m


async def test_votes_order_answers_and_live_sync(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=4)
    sid = klass.id
    a, b, c, d = klass.students
    cl = klass.students
    feed = Feed(cl[d], sid)
    q1 = (await cl[a].interaction.ask_question(scope=scope(sid), text="What is a monad?")).question
    q2 = (await cl[b].interaction.ask_question(scope=scope(sid), text="Why Rust?")).question
    q3 = (await cl[c].interaction.ask_question(scope=scope(sid), text="Tabs or spaces?")).question
    assert q1.status == IX.QUESTION_STATUS_OPEN and q1.author.user_id == a
    # q2: +2, q3: +1 -1 = 0, q1: 0 -> order q2, then q1 (older) before q3
    await cl[a].interaction.vote_question(session_id=sid, question_id=q2.id, vote=IX.VOTE_UP)
    await cl[c].interaction.vote_question(session_id=sid, question_id=q2.id, vote=IX.VOTE_UP)
    await cl[a].interaction.vote_question(session_id=sid, question_id=q3.id, vote=IX.VOTE_UP)
    voted = await cl[b].interaction.vote_question(
        session_id=sid, question_id=q3.id, vote=IX.VOTE_DOWN
    )
    assert (voted.question.upvotes, voted.question.downvotes, voted.question.score) == (1, 1, 0)
    assert voted.question.my_vote == IX.VOTE_DOWN
    listed = await cl[d].interaction.list_questions(scope=scope(sid))
    assert [q.id for q in listed.questions] == [q2.id, q1.id, q3.id]
    assert listed.total_size == 3
    # one vote per user, changeable: a changes +1 on q3 into -1; repeating changes nothing
    await cl[a].interaction.vote_question(session_id=sid, question_id=q3.id, vote=IX.VOTE_DOWN)
    same = await cl[a].interaction.vote_question(
        session_id=sid, question_id=q3.id, vote=IX.VOTE_DOWN
    )
    assert (same.question.upvotes, same.question.downvotes) == (0, 2)
    rows = await mesh.pool.fetch(
        "SELECT user_id, value FROM question_votes WHERE question_id = $1::uuid", q3.id
    )
    assert sorted((r["user_id"], r["value"]) for r in rows) == sorted([(a, -1), (b, -1)])
    removed = await cl[b].interaction.vote_question(
        session_id=sid, question_id=q3.id, vote=IX.VOTE_NONE
    )
    assert (removed.question.downvotes, removed.question.my_vote) == (1, IX.VOTE_NONE)
    await expect_error(
        cl[a].interaction.vote_question(session_id=sid, question_id=q1.id, vote=IX.VOTE_UP),
        Code.FAILED_PRECONDITION,
        "OWN_QUESTION",
    )
    # pinned first, whatever the score
    await klass.inst.interaction.moderate_question(
        session_id=sid, question_id=q3.id, action=IX.MODERATION_ACTION_PIN
    )
    listed = await cl[d].interaction.list_questions(scope=scope(sid))
    assert [q.id for q in listed.questions] == [q3.id, q2.id, q1.id]
    assert listed.questions[0].pinned
    # paging follows the same order
    p1 = await cl[d].interaction.list_questions(scope=scope(sid), page_size=2)
    p2 = await cl[d].interaction.list_questions(
        scope=scope(sid), page_size=2, page_token=p1.next_page_token
    )
    assert [q.id for q in [*p1.questions, *p2.questions]] == [q3.id, q2.id, q1.id]
    newest = await cl[d].interaction.list_questions(
        scope=scope(sid), order=RX.QUESTION_ORDER_NEWEST
    )
    assert [q.id for q in newest.questions] == [q3.id, q2.id, q1.id]
    # answer (text) and resolve (answered live)
    ans = await klass.inst.interaction.answer_question(
        session_id=sid, question_id=q1.id, text="A monoid in the category of endofunctors."
    )
    assert ans.question.status == IX.QUESTION_STATUS_ANSWERED
    assert ans.question.answer.answerer.user_id == klass.teacher
    live = await klass.inst.interaction.answer_question(
        session_id=sid, question_id=q2.id, answered_live=True
    )
    assert live.question.answer.answered_live and live.question.answer.text == ""
    await expect_error(
        klass.inst.interaction.answer_question(session_id=sid, question_id=q3.id),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    await expect_error(
        cl[d].interaction.answer_question(session_id=sid, question_id=q3.id, text="me!"),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    await expect_error(
        cl[d].interaction.vote_question(session_id=sid, question_id=q1.id, vote=IX.VOTE_UP),
        Code.FAILED_PRECONDITION,
        "INVALID_STATE_TRANSITION",
    )
    # everything above reached the feed, in order
    await feed.wait_count("question_asked", 3)
    await feed.wait_count("question_answered", 2)
    votes = await feed.wait_count("question_voted", 6)
    assert votes[-1].question_voted.question_id == q3.id
    assert votes[-1].question_voted.vote == IX.VOTE_NONE
    seqs = [e.seq for e in feed.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    await feed.stop()


async def test_moderation_queue_hide_dismiss_restore(mesh: Mesh) -> None:
    settings = session_pb2.SessionSettings(
        lobby_enabled=False, qa_enabled=True, qa_moderation_required=True
    )
    klass = await live_class(mesh, students=2, settings=settings)
    sid = klass.id
    a, b = klass.students
    cl = klass.students
    feed_b = Feed(cl[b], sid)
    feed_t = Feed(klass.inst, sid)
    pending = (
        await cl[a].interaction.ask_question(scope=scope(sid), text="Is this on the exam?")
    ).question
    assert pending.status == IX.QUESTION_STATUS_PENDING_REVIEW
    await feed_t.wait_for(lambda e: kind(e) == "question_asked")
    # others do not see it before approval
    assert (await cl[b].interaction.list_questions(scope=scope(sid))).questions == []
    await expect_error(
        cl[b].interaction.get_question(session_id=sid, question_id=pending.id),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )
    mine = await cl[a].interaction.get_question(session_id=sid, question_id=pending.id)
    assert mine.question.status == IX.QUESTION_STATUS_PENDING_REVIEW
    queue = await klass.inst.interaction.list_questions(
        scope=scope(sid), statuses=[IX.QUESTION_STATUS_PENDING_REVIEW]
    )
    assert [q.id for q in queue.questions] == [pending.id]
    await expect_error(
        cl[b].interaction.list_questions(
            scope=scope(sid), statuses=[IX.QUESTION_STATUS_PENDING_REVIEW]
        ),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    ok = await klass.inst.interaction.moderate_question(
        session_id=sid, question_id=pending.id, action=IX.MODERATION_ACTION_APPROVE
    )
    assert ok.question.status == IX.QUESTION_STATUS_OPEN
    approved = await feed_b.wait_for(lambda e: kind(e) == "question_moderated")
    assert approved.question_moderated.question.text == "Is this on the exam?"
    assert not feed_b.of("question_asked")  # the pending question never reached b
    # hide: b's feed learns it is gone, without its text
    await klass.inst.interaction.moderate_question(
        session_id=sid,
        question_id=pending.id,
        action=IX.MODERATION_ACTION_HIDE,
        reason="spoilers",
    )
    hidden = await feed_b.wait_for(
        lambda e: (
            kind(e) == "question_moderated"
            and e.question_moderated.action == IX.MODERATION_ACTION_HIDE
        )
    )
    assert hidden.question_moderated.question.status == IX.QUESTION_STATUS_HIDDEN
    assert hidden.question_moderated.question.text == ""
    assert (await cl[b].interaction.list_questions(scope=scope(sid))).questions == []
    await klass.inst.interaction.moderate_question(
        session_id=sid, question_id=pending.id, action=IX.MODERATION_ACTION_DISMISS
    )
    gone = await cl[a].interaction.list_questions(scope=scope(sid))
    assert gone.questions == []
    await expect_error(
        cl[a].interaction.get_question(session_id=sid, question_id=pending.id),
        Code.NOT_FOUND,
        "NOT_FOUND",
    )
    await expect_error(
        klass.inst.interaction.moderate_question(
            session_id=sid, question_id=pending.id, action=IX.MODERATION_ACTION_PIN
        ),
        Code.FAILED_PRECONDITION,
        "INVALID_STATE_TRANSITION",
    )
    back = await klass.inst.interaction.moderate_question(
        session_id=sid, question_id=pending.id, action=IX.MODERATION_ACTION_RESTORE
    )
    assert back.question.status == IX.QUESTION_STATUS_OPEN
    audit = await mesh.pool.fetch(
        "SELECT reason, metadata->>'action' AS action FROM audit_logs "
        "WHERE target_id = $1 ORDER BY created_at",
        pending.id,
    )
    assert [(r["action"], r["reason"]) for r in audit] == [("HIDE", "spoilers"), ("DISMISS", None)]
    await expect_error(
        cl[b].interaction.moderate_question(
            session_id=sid, question_id=pending.id, action=IX.MODERATION_ACTION_HIDE
        ),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    await feed_b.stop()
    await feed_t.stop()


async def test_anonymous_questions_hide_the_author(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=2)
    sid = klass.id
    a, b = klass.students
    feed = Feed(klass.students[b], sid)
    q = (
        await klass.students[a].interaction.ask_question(
            scope=scope(sid), text="Can we get an extension?", anonymous=True
        )
    ).question
    assert q.anonymous and q.author.user_id == a  # the author sees themself
    seen = await feed.wait_for(lambda e: kind(e) == "question_asked")
    assert seen.question_asked.question.author.user_id == ""
    assert seen.actor.user_id == ""
    other = await klass.students[b].interaction.get_question(session_id=sid, question_id=q.id)
    assert other.question.author.user_id == "" and other.question.anonymous
    mod = await klass.inst.interaction.get_question(session_id=sid, question_id=q.id)
    assert mod.question.author.user_id == a  # moderators see it for abuse handling
    logged = await mesh.pool.fetchval(
        "SELECT count(*) FROM session_events WHERE session_id = $1::uuid "
        "AND (payload::text LIKE '%' || $2 || '%' OR actor::text LIKE '%' || $2 || '%')",
        sid,
        a,
    )
    assert logged == 1  # only a's own participant_joined names a
    await feed.stop()


async def test_spam_prevention(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    sid = klass.id
    (student,) = klass.students.values()
    ask = student.interaction.ask_question
    await ask(scope=scope(sid), text="first question")
    await expect_error(
        ask(scope=scope(sid), text="  FIRST   question ", retry=NO_RETRY),
        Code.ALREADY_EXISTS,
        "ALREADY_EXISTS",
    )
    await expect_error(
        ask(
            scope=scope(sid),
            text="buy http://a.example http://b.example www.c.example",
            retry=NO_RETRY,
        ),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    for text in ("", "x" * 1001, "<script>alert(1)</script>"):
        await expect_error(
            ask(scope=scope(sid), text=text, retry=NO_RETRY),
            Code.INVALID_ARGUMENT,
            "VALIDATION_FAILED",
        )
    # 5 questions a minute: the first question and the duplicate counted (the limiter runs
    # before the duplicate check; malformed questions are refused before it), 3 more pass
    results = await asyncio.gather(
        *(ask(scope=scope(sid), text=f"question {i}", retry=NO_RETRY) for i in range(6)),
        return_exceptions=True,
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(ok) == 3, results
    for err in errors:
        assert getattr(err, "code", None) == Code.RESOURCE_EXHAUSTED, err
        assert err.reason == "RATE_LIMITED"  # type: ignore[attr-defined]
        assert 0 < err.retry_after <= 12.1  # type: ignore[attr-defined]
