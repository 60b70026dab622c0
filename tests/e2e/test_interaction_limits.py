"""Per-user limits with exact counts (RESOURCE_EXHAUSTED + RetryInfo) and the error matrix of
InteractionService: every refusal has its gRPC code and ErrorInfo reason."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from classmesh.interaction.v1 import interaction_pb2
from classmesh.session.v1 import session_pb2
from classmesh_sdk import NO_RETRY, ClassMeshClient, ClassMeshError
from tests.support.classroom import (
    Code,
    Feed,
    Mesh,
    classroom_mesh,
    expect_error,
    join,
    live_class,
    open_breakout_room,
    scope,
    uid,
)

IX = interaction_pb2
NOWHERE = "00000000-0000-4000-8000-000000000000"


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    # A pool larger than the bursts below: every request reaches the limiter at once.
    extra = {"CLASSMESH_DB_POOL_SIZE": "25"}
    async with classroom_mesh(
        admin_database_url, redis_url, tmp_path_factory, "limits", extra
    ) as m:
        yield m


def split(results: list[Any]) -> tuple[list[Any], list[ClassMeshError]]:
    ok = [r for r in results if not isinstance(r, BaseException)]
    bad = [r for r in results if isinstance(r, BaseException)]
    for err in bad:
        assert isinstance(err, ClassMeshError), err
    return ok, bad  # type: ignore[return-value]


def assert_rate_limited(err: ClassMeshError, limit: str, max_retry: float) -> None:
    assert (err.code, err.reason, err.domain) == (
        Code.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        "classmesh.dev",
    ), err
    assert err.metadata["limit"] == limit
    assert err.retry_after is not None and 0 < err.retry_after <= max_retry, err.retry_after


async def test_chat_allows_exactly_60_a_minute(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    (student,) = klass.students.values()
    sends = [
        student.interaction.send_chat_message(
            scope=scope(klass.id), text=f"spam {i}", retry=NO_RETRY
        )
        for i in range(61)
    ]
    ok, bad = split(await asyncio.gather(*sends, return_exceptions=True))
    assert (len(ok), len(bad)) == (60, 1)
    assert_rate_limited(bad[0], "chat", 1.0)
    stored = await mesh.pool.fetchval(
        "SELECT count(*) FROM chat_messages WHERE session_id = $1::uuid", klass.id
    )
    assert stored == 60
    # other users are not affected
    await klass.inst.interaction.send_chat_message(scope=scope(klass.id), text="teacher")
    # the SDK's default retry waits the RetryInfo delay and gets through
    late = await student.interaction.send_chat_message(scope=scope(klass.id), text="later")
    assert late.message.text == "later"


async def test_hand_raises_allow_exactly_10_a_minute(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    (student,) = klass.students.values()
    for i in range(10):
        await student.interaction.raise_hand(scope=scope(klass.id), retry=NO_RETRY)
        if i % 2 == 0:
            await student.interaction.lower_hand(scope=scope(klass.id))
    err = await expect_error(
        student.interaction.raise_hand(scope=scope(klass.id), retry=NO_RETRY),
        Code.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    assert_rate_limited(err, "hand_raise", 6.0)
    assert err.retry_after is not None and err.retry_after > 1.0  # 6 s per raise
    raises = await mesh.pool.fetchval(
        "SELECT count(*) FROM hand_raises WHERE session_id = $1::uuid", klass.id
    )
    # raises 1, 2, 4, 6, 8, 10 created a hand raise; the others returned the active one
    assert raises == 6


async def test_whiteboard_allows_exactly_10_updates_a_second(mesh: Mesh) -> None:
    klass = await live_class(mesh)

    def update(i: int) -> Any:
        el = IX.WhiteboardElement(
            id=str(uuid.uuid4()),
            kind=IX.WHITEBOARD_ELEMENT_KIND_SHAPE,
            shape="rectangle",
            x=float(i),
            width=10,
            height=10,
        )
        return klass.inst.interaction.update_whiteboard(
            scope=scope(klass.id), base_version=0, ops=[IX.WhiteboardOp(add=el)], retry=NO_RETRY
        )

    ok, bad = split(await asyncio.gather(*(update(i) for i in range(11)), return_exceptions=True))
    assert (len(ok), len(bad)) == (10, 1)
    assert_rate_limited(bad[0], "whiteboard_update", 0.1)
    assert sorted(r.version for r in ok) == list(range(1, 11))


async def test_error_matrix(mesh: Mesh, tmp_path: Any) -> None:
    klass = await live_class(mesh, students=2)
    sid = klass.id
    a, b = klass.students
    ca = klass.students[a]
    room = await open_breakout_room(mesh, sid, [a])
    # malformed input: INVALID_ARGUMENT naming the field
    err = await expect_error(
        ca.interaction.send_chat_message(scope=scope("not-a-uuid"), text="x"),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    assert err.field_violations[0][0] == "scope.session_id"
    await expect_error(
        ca.interaction.list_raised_hands(scope=scope(sid), page_size=-1),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    await expect_error(
        ca.interaction.vote_question(session_id=sid, question_id=NOWHERE),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    # unknown things: NOT_FOUND
    for call in (
        ca.interaction.get_timer(scope=scope(NOWHERE)),
        ca.interaction.get_poll(session_id=sid, poll_id=NOWHERE),
        ca.interaction.get_question(session_id=sid, question_id=NOWHERE),
        klass.inst.interaction.get_whiteboard(scope=scope(sid, NOWHERE)),
    ):
        await expect_error(call, Code.NOT_FOUND, "NOT_FOUND")
    # identity
    anonymous = ClassMeshClient(mesh.target)
    await expect_error(
        anonymous.interaction.get_timer(scope=scope(sid)), Code.UNAUTHENTICATED, "TOKEN_MISSING"
    )
    await anonymous.close()
    # who and where
    outsider = mesh.client(uid("outsider"))
    await expect_error(
        outsider.interaction.list_chat_messages(scope=scope(sid)),
        Code.PERMISSION_DENIED,
        "NOT_IN_SESSION",
    )
    await expect_error(  # a is in the breakout room: not in the main room
        ca.interaction.send_chat_message(scope=scope(sid), text="main?"),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    await expect_error(  # b is in the main room: not in a's room
        klass.students[b].interaction.raise_hand(scope=scope(sid, room)),
        Code.PERMISSION_DENIED,
        "PERMISSION_MISSING",
    )
    await ca.interaction.send_chat_message(scope=scope(sid, room), text="in my room")
    await mesh.pool.execute(
        "UPDATE breakout_rooms SET status = 'closed', closed_at = now() WHERE id = $1::uuid", room
    )
    await expect_error(  # moderators may act in any room, but not in a closed one
        klass.inst.interaction.send_chat_message(scope=scope(sid, room), text="hello?"),
        Code.FAILED_PRECONDITION,
        "BREAKOUT_ROOM_CLOSED",
    )
    # a lobby participant is not admitted yet
    lobby_class = await live_class(
        mesh, settings=session_pb2.SessionSettings(lobby_enabled=True, chat_enabled=True)
    )
    waiting = mesh.client(uid("waiting"))
    p = await join(waiting, lobby_class.id)
    assert p.status == session_pb2.PARTICIPANT_STATUS_LOBBY
    await expect_error(
        waiting.interaction.send_chat_message(scope=scope(lobby_class.id), text="let me in"),
        Code.PERMISSION_DENIED,
        "NOT_ADMITTED",
    )
    # removed participants are out, and their live feed ends with PARTICIPANT_REMOVED
    feed = Feed(klass.students[b], sid)
    await feed.ready()
    await klass.inst.sessions.remove_participant(session_id=sid, user_id=b, reason="spam")
    await feed.task
    assert feed.error is not None and feed.error.reason == "PARTICIPANT_REMOVED"
    await expect_error(
        klass.students[b].interaction.send_chat_message(scope=scope(sid), text="back"),
        Code.PERMISSION_DENIED,
        "PARTICIPANT_REMOVED",
    )
    # feeds: a cursor past the log's end
    await expect_error(
        anext(
            aiter(
                klass.inst.interaction.subscribe(scope=scope(sid), after_seq=10**9, retry=NO_RETRY)
            )
        ),
        Code.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    # a session that ended: its feed ends, new mutations are refused
    ended_feed = Feed(klass.inst, sid)
    await klass.inst.sessions.end_session(session_id=sid)
    await ended_feed.task
    assert ended_feed.error is None and ended_feed.of("session_ended")
    await expect_error(
        klass.inst.interaction.raise_hand(scope=scope(sid)),
        Code.FAILED_PRECONDITION,
        "SESSION_ENDED",
    )
