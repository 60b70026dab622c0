"""Redis restarted in the middle of a chat: no subscriber misses a message.

The mesh runs against a private redis-server. While it is stopped, sends still succeed
(the event log is in PostgreSQL; publishing and the rate limiter fail open) and the live
feeds back-fill from the log; after the restart they go live again. Every subscriber ends
with every message exactly once, in seq order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.classroom import Feed, Mesh, classroom_mesh, live_class, scope
from tests.support.redis_server import PrivateRedis


@pytest.fixture(scope="module")
async def private_redis() -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str,
    private_redis: PrivateRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Mesh]:
    extra = {"CLASSMESH_CHAT_MESSAGES_PER_MINUTE": "100000"}
    async with classroom_mesh(
        admin_database_url, private_redis.url, tmp_path_factory, "redisrestart", extra
    ) as m:
        yield m


async def test_no_subscriber_misses_a_message_across_a_redis_restart(
    mesh: Mesh, private_redis: PrivateRedis
) -> None:
    klass = await live_class(mesh, students=3)
    sid = klass.id
    clients = [klass.inst, *klass.students.values()]
    feeds = [Feed(c, sid) for c in clients]
    sender = next(iter(klass.students.values()))
    sent: list[str] = []

    async def send(n: int, pause: float = 0.02) -> None:
        for _ in range(n):
            resp = await sender.interaction.send_chat_message(
                scope=scope(sid), text=f"msg {len(sent)}"
            )
            sent.append(resp.message.id)
            await asyncio.sleep(pause)

    await send(20)
    for feed in feeds:  # live before the outage
        await feed.wait_count("chat_message_posted", 20)
    await private_redis.stop()
    await send(25)  # Redis is down: the log takes them, the feeds poll it
    for feed in feeds:
        await feed.wait_count("chat_message_posted", 45, timeout=20)
    await private_redis.start()
    await send(25)  # live again (or back-filled while the bus reconnects)
    total = len(sent)
    for feed in feeds:
        await feed.wait_count("chat_message_posted", total, timeout=20)
        await feed.quiet(0.5)
        got = feed.of("chat_message_posted")
        assert [e.chat_message_posted.message.id for e in got] == sent
        seqs = [e.seq for e in got]
        assert seqs == sorted(set(seqs))
        assert feed.error is None and not feed.ended
        await feed.stop()
    # the outage was real: the server lost its pub/sub connection and got it back
    log = Path(mesh.proc._stderr_path).read_text()  # type: ignore[attr-defined]
    assert "bus pub/sub connection lost" in log
    assert "bus pub/sub reconnected" in log
