"""The bidirectional Connect stream: subscribe, commands with results correlated by
request_id, errors as messages while the stream goes on, idempotent commands, moving the
subscription between rooms, acks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from classmesh.interaction.v1 import interaction_pb2, interaction_service_pb2
from tests.support.classroom import (
    Mesh,
    classroom_mesh,
    db_events,
    kind,
    live_class,
    open_breakout_room,
    scope,
)

IX = interaction_pb2
RX = interaction_service_pb2


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with classroom_mesh(admin_database_url, redis_url, tmp_path_factory, "connect") as m:
        yield m


class Stream:
    """One Connect call with its responses read in the background."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        self.call = call
        self.items: list[RX.ConnectResponse] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for item in self.call:
            self.items.append(item)
            self._changed.set()

    async def send(self, **fields: object) -> None:
        await self.call.write(RX.ConnectRequest(**fields))  # type: ignore[arg-type]

    async def answer(self, request_id: str, timeout: float = 10) -> RX.ConnectResponse:
        return await self.first(lambda r: r.request_id == request_id, timeout)

    async def first(self, pred: object, timeout: float = 10) -> RX.ConnectResponse:
        async with asyncio.timeout(timeout):
            while True:
                for item in self.items:
                    if pred(item):  # type: ignore[operator]
                        return item
                self._changed.clear()
                await self._changed.wait()

    def events(self, type_: str) -> list[object]:
        return [
            r.event
            for r in self.items
            if r.WhichOneof("message") == "event" and kind(r.event) == type_
        ]

    async def close(self) -> None:
        self.call.cancel()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self.task


def error_of(resp: RX.ConnectResponse) -> tuple[int, str]:
    status = status_pb2.Status.FromString(resp.error.SerializeToString())
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "classmesh.dev"
            return status.code, info.reason
    raise AssertionError(f"no ErrorInfo in {status}")


async def test_commands_results_errors_and_events_on_one_stream(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    sid = klass.id
    (student,) = klass.students.values()
    s = Stream(student.interaction.connect())
    await s.send(subscribe=RX.ConnectSubscribe(scope=scope(sid)))
    await s.send(
        send_chat_message=RX.SendChatMessageRequest(request_id="c-1", scope=scope(sid), text="hi")
    )
    ok = await s.answer("c-1")
    assert ok.WhichOneof("message") == "result"
    assert ok.result.send_chat_message.message.text == "hi"
    posted = await s.first(
        lambda r: r.WhichOneof("message") == "event" and kind(r.event) == "chat_message_posted"
    )
    assert posted.event.chat_message_posted.message.id == ok.result.send_chat_message.message.id
    assert posted.event.request_id == "c-1"
    # a failing command answers with an error and the stream goes on
    await s.send(
        send_chat_message=RX.SendChatMessageRequest(request_id="c-2", scope=scope(sid), text=" ")
    )
    bad = await s.answer("c-2")
    assert bad.WhichOneof("message") == "error"
    assert error_of(bad) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "VALIDATION_FAILED")
    await s.send(raise_hand=RX.RaiseHandRequest(request_id="c-3", scope=scope(sid)))
    hand = await s.answer("c-3")
    assert hand.result.raise_hand.hand_raise.status == IX.HAND_RAISE_STATUS_ACTIVE
    await s.send(
        acknowledge_hand=RX.AcknowledgeHandRequest(
            request_id="c-4", session_id=sid, hand_raise_id=hand.result.raise_hand.hand_raise.id
        )
    )
    denied = await s.answer("c-4")
    assert error_of(denied) == (grpc.StatusCode.PERMISSION_DENIED.value[0], "PERMISSION_MISSING")
    # the instructor's poll reaches the stream; answering a closed one is an error message
    poll = (
        await klass.inst.interaction.create_poll(
            scope=scope(sid), question="Ready?", options=["yes", "no"]
        )
    ).poll
    await s.first(lambda r: r.WhichOneof("message") == "event" and kind(r.event) == "poll_created")
    await s.send(
        respond_to_poll=RX.RespondToPollRequest(
            request_id="c-5", session_id=sid, poll_id=poll.id, option_indexes=[0]
        )
    )
    assert (await s.answer("c-5")).result.respond_to_poll.poll.my_selection == [0]
    await klass.inst.interaction.close_poll(session_id=sid, poll_id=poll.id)
    await s.send(
        respond_to_poll=RX.RespondToPollRequest(
            request_id="c-6", session_id=sid, poll_id=poll.id, option_indexes=[1]
        )
    )
    assert error_of(await s.answer("c-6")) == (
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        "POLL_CLOSED",
    )
    await s.send(ack=RX.ConnectAck(seq=posted.event.seq))
    # a message with nothing set is an error too, and the stream still works after it
    await s.send()
    empty = await s.first(lambda r: r.WhichOneof("message") == "error" and not r.request_id)
    assert error_of(empty)[1] == "VALIDATION_FAILED"
    await s.send(
        send_chat_message=RX.SendChatMessageRequest(request_id="c-7", scope=scope(sid), text="bye")
    )
    assert (await s.answer("c-7")).result.send_chat_message.message.text == "bye"
    await s.close()


async def test_repeated_request_id_is_idempotent(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    sid = klass.id
    (student,) = klass.students.values()
    s = Stream(student.interaction.connect())
    req = RX.SendChatMessageRequest(request_id="same-1", scope=scope(sid), text="once")
    await s.send(send_chat_message=req)
    first = await s.answer("same-1")
    await s.send(send_chat_message=req)
    await s.first(lambda r: r.request_id == "same-1" and r is not first)
    answers = [r for r in s.items if r.request_id == "same-1"]
    assert len(answers) == 2
    assert answers[0].result == answers[1].result
    chats = [r for r in await db_events(mesh.pool, sid) if r["type"] == "chat_message_posted"]
    assert len(chats) == 1
    # the same key with another body is refused
    other = RX.SendChatMessageRequest(request_id="same-1", scope=scope(sid), text="twice")
    await s.send(send_chat_message=other)
    await s.first(lambda r: r.request_id == "same-1" and r.WhichOneof("message") == "error")
    err = next(
        r for r in s.items if r.request_id == "same-1" and r.WhichOneof("message") == "error"
    )
    assert error_of(err) == (grpc.StatusCode.ALREADY_EXISTS.value[0], "IDEMPOTENCY_KEY_REUSED")
    await s.close()


async def test_subscription_moves_between_rooms(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=2)
    sid = klass.id
    a, b = klass.students
    room = await open_breakout_room(mesh, sid, [a])
    s = Stream(klass.inst.interaction.connect())
    await s.send(subscribe=RX.ConnectSubscribe(scope=scope(sid)))
    await klass.students[b].interaction.send_chat_message(scope=scope(sid), text="main 1")
    await s.first(
        lambda r: r.WhichOneof("message") == "event" and kind(r.event) == "chat_message_posted"
    )
    # move to the room: from now on only its events (replayed from its start)
    await s.send(subscribe=RX.ConnectSubscribe(scope=scope(sid, room)))
    await klass.students[a].interaction.send_chat_message(scope=scope(sid, room), text="room 1")
    await klass.students[b].interaction.send_chat_message(scope=scope(sid), text="main 2")
    await s.first(
        lambda r: (
            r.WhichOneof("message") == "event"
            and kind(r.event) == "chat_message_posted"
            and r.event.chat_message_posted.message.text == "room 1"
        )
    )
    await asyncio.sleep(0.5)
    texts = [e.chat_message_posted.message.text for e in s.events("chat_message_posted")]  # type: ignore[attr-defined]
    assert texts == ["main 1", "room 1"]
    # a subscription the caller may not have is an error message, the old one keeps going
    s2 = Stream(klass.students[b].interaction.connect())
    await s2.send(subscribe=RX.ConnectSubscribe(scope=scope(sid, room)))
    refused = await s2.first(lambda r: r.WhichOneof("message") == "error")
    assert error_of(refused) == (grpc.StatusCode.PERMISSION_DENIED.value[0], "PERMISSION_MISSING")
    await s.close()
    await s2.close()


@pytest.fixture(scope="module")
async def tight(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    """A mesh with a small Connect window, so flow control shows with a few events."""
    extra = {"CLASSMESH_CONNECT_MAX_UNACKED": "5", "CLASSMESH_CONNECT_ACK_WAIT_SECONDS": "0.5"}
    async with classroom_mesh(admin_database_url, redis_url, tmp_path_factory, "tight", extra) as m:
        yield m


async def test_flow_control_acks_and_slow_consumers(tight: Mesh) -> None:
    klass = await live_class(tight, students=2)
    sid = klass.id
    (a, ca), (b, cb) = klass.students.items()
    acking = Stream(ca.interaction.connect())
    silent = Stream(cb.interaction.connect())
    for s in (acking, silent):
        await s.send(subscribe=RX.ConnectSubscribe(scope=scope(sid)))
    for i in range(8):
        await klass.inst.interaction.send_chat_message(scope=scope(sid), text=f"m{i}")
        # the acking client acknowledges what it has processed
        async with asyncio.timeout(10):
            while len(acking.events("chat_message_posted")) < i + 1:
                await asyncio.sleep(0.01)
        await acking.send(ack=RX.ConnectAck(seq=acking.items[-1].event.seq))
    assert len(acking.events("chat_message_posted")) == 8
    # the silent one got the window's worth, then SLOW_CONSUMER, then the call ended
    await asyncio.wait_for(silent.task, 10)
    got = [r for r in silent.items if r.WhichOneof("message") == "event"]
    assert len(got) == 5
    last = silent.items[-1]
    assert error_of(last) == (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "SLOW_CONSUMER")
    status = status_pb2.Status.FromString(last.error.SerializeToString())
    info = error_details_pb2.ErrorInfo()
    next(d for d in status.details if d.Is(info.DESCRIPTOR)).Unpack(info)
    assert info.metadata["afterSeq"] == "0"  # it acknowledged nothing: resume from the start
    await acking.close()
