"""Ordering under load: 20 concurrent senders x 100 messages; every subscriber receives all
2,000 messages exactly once, in seq order, and each sender's messages in the order sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from classmesh_sdk import ClassMeshClient
from tests.support.classroom import Feed, Mesh, classroom_mesh, live_class, scope

SENDERS = 20
PER_SENDER = 100


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    # The seed's 60 messages/min per user is raised explicitly: each sender sends 100 at once.
    extra = {
        "CLASSMESH_CHAT_MESSAGES_PER_MINUTE": "100000",
        "CLASSMESH_RATE_LIMIT_PER_MINUTE": "0",
        "CLASSMESH_DB_POOL_SIZE": "24",
    }
    async with classroom_mesh(admin_database_url, redis_url, tmp_path_factory, "load", extra) as m:
        yield m


async def test_20_senders_x_100_messages_reach_every_subscriber_in_order(mesh: Mesh) -> None:
    klass = await live_class(mesh, students=SENDERS, capacity=100)
    sid = klass.id
    senders = list(klass.students.items())
    subscribers: list[ClassMeshClient] = [klass.inst, *(c for _, c in senders[:4])]
    feeds = [Feed(c, sid) for c in subscribers]
    await asyncio.sleep(0.3)

    async def send_all(user: str, client: ClassMeshClient) -> list[str]:
        ids = []
        for i in range(PER_SENDER):
            resp = await client.interaction.send_chat_message(scope=scope(sid), text=f"{user} {i}")
            ids.append(resp.message.id)
        return ids

    sent = await asyncio.gather(*(send_all(u, c) for u, c in senders))
    total = SENDERS * PER_SENDER
    all_ids = {i for ids in sent for i in ids}
    assert len(all_ids) == total
    for feed in feeds:
        got = await feed.wait_count("chat_message_posted", total, timeout=60)
        await feed.quiet(0.5)
        got = feed.of("chat_message_posted")
        assert len(got) == total, "duplicates or extras"
        seqs = [e.seq for e in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == total
        assert {e.chat_message_posted.message.id for e in got} == all_ids
        for (user, _), ids in zip(senders, sent, strict=True):
            mine = [
                e.chat_message_posted.message.id
                for e in got
                if e.chat_message_posted.message.sender.user_id == user
            ]
            assert mine == ids, f"{user}'s messages out of order"
        assert feed.error is None
        await feed.stop()
    # history agrees with the feed
    stored = await mesh.pool.fetch(
        "SELECT seq FROM chat_messages WHERE session_id = $1::uuid ORDER BY seq", sid
    )
    assert len(stored) == total
