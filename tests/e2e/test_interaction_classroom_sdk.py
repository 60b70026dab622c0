"""The SDK's `Classroom` helper: typed events from a Subscribe that resumes by itself (with
after_seq) when the connection drops, without losing or repeating an event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from classmesh.events.v1 import events_pb2
from classmesh_sdk import ClassMeshClient, Classroom, ClassroomEvent
from tests.support.classroom import Mesh, classroom_mesh, live_class
from tests.support.proxy import TcpProxy


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    extra = {"CLASSMESH_CHAT_MESSAGES_PER_MINUTE": "10000"}
    async with classroom_mesh(
        admin_database_url, redis_url, tmp_path_factory, "classroom", extra
    ) as m:
        yield m


class Reader:
    def __init__(self, room: Classroom) -> None:
        self.got: list[ClassroomEvent] = []
        self.task = asyncio.create_task(self._run(room))

    async def _run(self, room: Classroom) -> None:
        async for ev in room.events():
            self.got.append(ev)

    def chats(self) -> list[str]:
        return [e.payload.message.text for e in self.got if e.type == "chat_message_posted"]  # type: ignore[attr-defined]

    async def until(self, n: int, timeout: float = 15) -> None:
        async with asyncio.timeout(timeout):
            while len(self.chats()) < n:
                assert not self.task.done(), self.task
                await asyncio.sleep(0.02)


async def test_typed_events_and_shortcuts(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    (student,) = klass.students.values()
    room = Classroom(student, klass.id)
    reader = Reader(room)
    msg = await room.send_chat("hello")
    hand = await room.raise_hand()
    q = await room.ask("what is next?")
    poll = (
        await klass.inst.interaction.create_poll(
            scope=room.scope, question="ok?", options=["y", "n"]
        )
    ).poll
    answered = await room.respond(poll.id, 1)
    assert list(answered.my_selection) == [1]
    await reader.until(1)
    async with asyncio.timeout(10):
        while len(reader.got) < 6:
            await asyncio.sleep(0.02)
    types = [e.type for e in reader.got]
    assert types == [
        "session_started",  # the main room carries the session's announcements
        "chat_message_posted",
        "hand_raised",
        "question_asked",
        "poll_created",
        "poll_results_changed",
    ]
    first = reader.got[1]
    assert isinstance(first.payload, events_pb2.ChatMessagePosted)
    assert first.payload.message.id == msg.id and first.seq == msg.seq
    assert isinstance(reader.got[2].payload, events_pb2.HandRaised)
    assert reader.got[2].payload.hand_raise.id == hand.id
    assert reader.got[3].payload.question.id == q.id  # type: ignore[attr-defined]
    assert first.actor.user_id == next(iter(klass.students))
    assert room.last_seq == reader.got[-1].seq
    # the stream ends with the session
    await klass.inst.sessions.end_session(session_id=klass.id)
    await asyncio.wait_for(reader.task, 10)
    assert reader.got[-1].type == "session_ended"


async def test_reconnects_with_after_seq_and_loses_nothing(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=1)
    (user, direct) = next(iter(klass.students.items()))
    host, port = mesh.target.rsplit(":", 1)
    proxy = await TcpProxy(host, int(port)).start()
    through = ClassMeshClient(f"127.0.0.1:{proxy.port}", token=mesh.token(user))
    room = Classroom(through, klass.id, types={"chat_message_posted"}, max_backoff=0.5)
    reader = Reader(room)
    sent: list[str] = []

    async def send(n: int) -> None:
        for _ in range(n):
            text = f"m{len(sent)}"
            await direct.interaction.send_chat_message(scope=room.scope, text=text)
            sent.append(text)

    await send(10)
    await reader.until(10)
    proxy.sever()  # the connection drops; messages keep coming meanwhile
    await send(10)
    await asyncio.sleep(0.5)
    proxy.restore()
    await send(10)
    await reader.until(30)
    await asyncio.sleep(0.3)
    assert reader.chats() == sent  # every message once, in order
    assert room.reconnects >= 1
    seqs = [e.seq for e in reader.got]
    assert seqs == sorted(set(seqs))
    reader.task.cancel()
    await through.close()
    await proxy.stop()
