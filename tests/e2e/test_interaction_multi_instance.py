"""Two `classmesh serve interaction` processes on different ports, sharing PostgreSQL and
Redis (beside a `classmesh up` that serves SessionService): a subscriber on one receives
what is sent through the other, both ways, on Subscribe and on Connect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from classmesh.interaction.v1 import interaction_service_pb2
from classmesh_sdk import ClassMeshClient
from tests.support.classroom import (
    Feed,
    Mesh,
    classroom_mesh,
    kind,
    live_class,
    mesh_env,
    scope,
)
from tests.support.mesh import MeshProcess, start_mesh

RX = interaction_service_pb2


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with classroom_mesh(admin_database_url, redis_url, tmp_path_factory, "multi") as m:
        yield m


@pytest.fixture(scope="module")
async def instances(
    mesh: Mesh, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[list[MeshProcess]]:
    procs = []
    try:
        for i in range(2):
            logdir = tmp_path_factory.mktemp(f"interaction{i}")
            env = mesh_env(mesh.dsn, redis_url, logdir, {})
            env["CLASSMESH_REDIS_PREFIX"] = mesh.env["CLASSMESH_REDIS_PREFIX"]
            proc = start_mesh(env, str(logdir / "stderr.log"), "serve", "interaction")
            procs.append(proc)
            proc.wait_ready()
            assert proc.target and proc.target != mesh.target
            assert proc.lines[-1] == "ready: classmesh.interaction.v1.InteractionService"
        yield procs
    finally:
        for proc in procs:
            if proc.proc.poll() is None:
                proc.terminate()
            proc.kill()


async def test_a_subscriber_on_one_instance_gets_what_is_sent_through_the_other(
    mesh: Mesh, instances: list[MeshProcess]
) -> None:
    klass = await live_class(mesh, students=2)  # created and joined through SessionService
    sid = klass.id
    (a, _), (b, _) = klass.students.items()
    one, two = instances
    a_on_one = mesh.client(a, "student", target=one.target)
    b_on_two = mesh.client(b, "student", target=two.target)
    teacher_on_two = mesh.client(klass.teacher, "instructor", target=two.target)
    feed_one = Feed(a_on_one, sid)
    feed_two = Feed(b_on_two, sid)
    await asyncio.sleep(0.3)

    sent_two = await b_on_two.interaction.send_chat_message(scope=scope(sid), text="via two")
    sent_one = await a_on_one.interaction.send_chat_message(scope=scope(sid), text="via one")
    hand = await a_on_one.interaction.raise_hand(scope=scope(sid))
    poll = await teacher_on_two.interaction.create_poll(
        scope=scope(sid), question="Where?", options=["one", "two"], show_results_live=True
    )
    await a_on_one.interaction.respond_to_poll(
        session_id=sid, poll_id=poll.poll.id, option_indexes=[0]
    )
    for feed in (feed_one, feed_two):
        chats = await feed.wait_count("chat_message_posted", 2)
        assert [e.chat_message_posted.message.id for e in chats] == [
            sent_two.message.id,
            sent_one.message.id,
        ]
        raised = await feed.wait_count("hand_raised", 1)
        assert raised[0].hand_raised.hand_raise.id == hand.hand_raise.id
        results = await feed.wait_count("poll_results_changed", 1)
        assert results[0].poll_results_changed.results.respondent_count == 1
    assert [e.seq for e in feed_one.events] == [e.seq for e in feed_two.events]
    # the instance that served nothing of it still answers reads from the shared database
    history = await b_on_two.interaction.list_chat_messages(scope=scope(sid))
    assert [m.text for m in history.messages] == ["via one", "via two"]
    await feed_one.stop()
    await feed_two.stop()


async def test_connect_on_one_instance_sees_commands_sent_to_the_other(
    mesh: Mesh, instances: list[MeshProcess]
) -> None:
    klass = await live_class(mesh, students=2)
    sid = klass.id
    (a, _), (b, _) = klass.students.items()
    one, two = instances
    a_on_one: ClassMeshClient = mesh.client(a, "student", target=one.target)
    b_on_two: ClassMeshClient = mesh.client(b, "student", target=two.target)
    call = a_on_one.interaction.connect()
    await call.write(RX.ConnectRequest(subscribe=RX.ConnectSubscribe(scope=scope(sid))))
    call_b = b_on_two.interaction.connect()
    await call_b.write(
        RX.ConnectRequest(
            ask_question=RX.AskQuestionRequest(
                request_id="q-1", scope=scope(sid), text="Does this scale out?"
            )
        )
    )
    answer = await asyncio.wait_for(call_b.read(), 10)
    assert answer.request_id == "q-1" and answer.WhichOneof("message") == "result"
    async with asyncio.timeout(10):
        while True:
            item = await call.read()
            if item.WhichOneof("message") == "event" and kind(item.event) == "question_asked":
                break
    assert item.event.question_asked.question.id == answer.result.ask_question.question.id
    call.cancel()
    call_b.cancel()
