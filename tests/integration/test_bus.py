"""Live bus against real PostgreSQL and Redis: replay then live, exactly once, in order,
through gaps, Redis cut-offs, a Redis restart and slow consumers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from classmesh.core.bus import Bus, BusOptions, channel_name
from classmesh.core.events import EventRecord
from tests.support.db import commit_event, make_session
from tests.support.proxy import TcpProxy
from tests.support.redis_server import PrivateRedis

# Short timers keep the tests fast; the mechanisms are the production ones.
FAST = BusOptions(
    poll_interval=0.1,
    idle_poll_interval=0.3,
    publish_timeout=0.3,
    backoff_min=0.02,
    backoff_max=0.2,
    connect_timeout=0.5,
)
# Idle polling effectively off: only the mechanism under test can deliver.
NO_IDLE = BusOptions(idle_poll_interval=3600, poll_interval=0.1, backoff_max=0.2)
# For outages: only polling-while-down and reconnection can deliver what Redis missed.
OUTAGE = BusOptions(
    poll_interval=0.1,
    idle_poll_interval=3600,
    publish_timeout=0.3,
    backoff_min=0.02,
    backoff_max=0.2,
    connect_timeout=0.5,
)


async def take(it: AsyncIterator[EventRecord], n: int, timeout: float = 10.0) -> list[EventRecord]:
    out: list[EventRecord] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out.append(await anext(it))
    return out


async def nothing_more(it: AsyncIterator[EventRecord], wait: float = 0.3) -> bool:
    """True when the iterator yields nothing for `wait` seconds (checks for duplicates).

    The timeout cancels the pending `anext`, which ends the subscription: call it last.
    """
    try:
        async with asyncio.timeout(wait):
            await anext(it)
    except TimeoutError:
        return True
    return False


async def publish_new(
    bus: Bus, pool: asyncpg.Pool, tenant: str, session: str, type: str = "test.event"
) -> EventRecord:
    record = await commit_event(pool, tenant, session, type)
    await bus.publish(record)
    return record


class Collector:
    """Drains a subscription in the background, as a gRPC stream handler would."""

    def __init__(self, it: AsyncIterator[EventRecord]) -> None:
        self.got: list[EventRecord] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(it))

    async def _run(self, it: AsyncIterator[EventRecord]) -> None:
        async for record in it:
            self.got.append(record)
            self._changed.set()

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[int]:
        async with asyncio.timeout(timeout):
            while len(self.got) < n:
                self._changed.clear()
                await self._changed.wait()
        return seqs(self.got)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def seqs(records: list[EventRecord]) -> list[int]:
    return [r.seq for r in records]


def fast_failing_client(url: str) -> aioredis.Redis:
    # No client-side retries: a test cut off from Redis should fail fast, not wait.
    return aioredis.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5)


@pytest.fixture
async def session(pool: asyncpg.Pool) -> tuple[str, str]:
    return await make_session(pool)


@pytest.fixture
async def bus(
    redis_client: aioredis.Redis, pool: asyncpg.Pool, redis_prefix: str
) -> AsyncIterator[Bus]:
    b = Bus(redis_client, pool, redis_prefix, options=FAST)
    yield b
    await b.close()


async def test_replay_then_live_in_order(
    bus: Bus, pool: asyncpg.Pool, session: tuple[str, str]
) -> None:
    tenant, sid = session
    for _ in range(3):
        await commit_event(pool, tenant, sid)  # before anyone listens: replay only
    it = bus.subscribe(tenant_id=tenant, session_id=sid)
    assert seqs(await take(it, 3)) == [1, 2, 3]
    for _ in range(2):
        await publish_new(bus, pool, tenant, sid)
    got = await take(it, 2)
    assert seqs(got) == [4, 5]
    assert all(r.tenant_id == tenant and r.session_id == sid for r in got)
    assert await nothing_more(it)


async def test_replay_pages_through_many_events(
    redis_client: aioredis.Redis, pool: asyncpg.Pool, redis_prefix: str, session: tuple[str, str]
) -> None:
    tenant, sid = session
    for _ in range(25):
        await commit_event(pool, tenant, sid)
    b = Bus(redis_client, pool, redis_prefix, options=BusOptions(page_size=7))
    try:
        it = b.subscribe(tenant_id=tenant, session_id=sid)
        assert seqs(await take(it, 25)) == list(range(1, 26))
        assert await nothing_more(it)
    finally:
        await b.close()


async def test_resume_with_after_seq(
    bus: Bus, pool: asyncpg.Pool, session: tuple[str, str]
) -> None:
    tenant, sid = session
    for _ in range(5):
        await publish_new(bus, pool, tenant, sid)
    it = bus.subscribe(tenant_id=tenant, session_id=sid, after_seq=3)
    assert seqs(await take(it, 2)) == [4, 5]
    await publish_new(bus, pool, tenant, sid)
    assert seqs(await take(it, 1)) == [6]


async def test_two_subscribers_share_one_redis_subscription(
    bus: Bus,
    pool: asyncpg.Pool,
    session: tuple[str, str],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    tenant, sid = session
    await commit_event(pool, tenant, sid)
    a = bus.subscribe(tenant_id=tenant, session_id=sid)
    b = bus.subscribe(tenant_id=tenant, session_id=sid)
    assert seqs(await take(a, 1)) == [1]
    assert seqs(await take(b, 1)) == [1]
    # One pub/sub connection per bus, however many subscribers in this process.
    counts = await redis_client.pubsub_numsub(channel_name(redis_prefix, sid))
    assert counts[0][1] == 1
    for _ in range(10):
        await publish_new(bus, pool, tenant, sid)
    assert seqs(await take(a, 10)) == list(range(2, 12))
    assert seqs(await take(b, 10)) == list(range(2, 12))


async def test_types_filter(bus: Bus, pool: asyncpg.Pool, session: tuple[str, str]) -> None:
    tenant, sid = session
    for t in ["chat", "poll", "chat"]:
        await commit_event(pool, tenant, sid, t)
    it = bus.subscribe(tenant_id=tenant, session_id=sid, types={"poll"})
    assert [(r.seq, r.type) for r in await take(it, 1)] == [(2, "poll")]
    for t in ["chat", "chat", "poll"]:  # seq 4, 5, 6: skipped ones must not look like a gap
        await publish_new(bus, pool, tenant, sid, t)
    assert [(r.seq, r.type) for r in await take(it, 1)] == [(6, "poll")]
    assert await nothing_more(it)


async def test_other_tenant_sees_nothing(
    bus: Bus, pool: asyncpg.Pool, session: tuple[str, str]
) -> None:
    tenant, sid = session
    other, _ = await make_session(pool)
    await commit_event(pool, tenant, sid)
    mine = bus.subscribe(tenant_id=tenant, session_id=sid)
    theirs = bus.subscribe(tenant_id=other, session_id=sid)
    assert seqs(await take(mine, 1)) == [1]
    await publish_new(bus, pool, tenant, sid)
    assert seqs(await take(mine, 1)) == [2]
    assert await nothing_more(theirs)


async def test_gap_is_back_filled_in_order(
    redis_client: aioredis.Redis, pool: asyncpg.Pool, redis_prefix: str, session: tuple[str, str]
) -> None:
    tenant, sid = session
    b = Bus(redis_client, pool, redis_prefix, options=NO_IDLE)
    try:
        it = b.subscribe(tenant_id=tenant, session_id=sid)
        await publish_new(b, pool, tenant, sid)
        assert seqs(await take(it, 1)) == [1]
        await commit_event(pool, tenant, sid)  # seq 2: committed, never published
        await publish_new(b, pool, tenant, sid)  # seq 3 reveals the gap
        assert seqs(await take(it, 2)) == [2, 3]
        assert await nothing_more(it)
    finally:
        await b.close()


async def test_dropped_tail_message_arrives_by_idle_poll(
    bus: Bus, pool: asyncpg.Pool, session: tuple[str, str]
) -> None:
    tenant, sid = session
    col = Collector(bus.subscribe(tenant_id=tenant, session_id=sid))
    try:
        await publish_new(bus, pool, tenant, sid)
        assert await col.wait_for(1) == [1]
        await publish_new(bus, pool, tenant, sid)
        assert await col.wait_for(2) == [1, 2]  # live and idle: nothing pending
        await commit_event(pool, tenant, sid)  # the last event's message is "lost"
        assert await col.wait_for(3, timeout=5) == [1, 2, 3]
    finally:
        await col.stop()


async def test_redis_cut_off_and_restored(
    pool: asyncpg.Pool, redis_url: str, redis_prefix: str, session: tuple[str, str]
) -> None:
    tenant, sid = session
    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    proxy = await TcpProxy(host, int(port)).start()
    client = fast_failing_client(proxy.url)
    b = Bus(client, pool, redis_prefix, options=OUTAGE)
    col = Collector(b.subscribe(tenant_id=tenant, session_id=sid))
    try:
        await publish_new(b, pool, tenant, sid)
        assert await col.wait_for(1) == [1]
        await publish_new(b, pool, tenant, sid)
        assert await col.wait_for(2) == [1, 2]  # live and idle: nothing pending
        assert b.connected

        proxy.sever()
        for _ in range(5):  # seq 3..7: commit succeeds, publish fails and is swallowed
            await publish_new(b, pool, tenant, sid)
        # Still cut off (idle polling is off): they arrive by polling while Redis is down.
        assert await col.wait_for(7) == list(range(1, 8))
        assert not b.connected

        proxy.restore()
        for _ in range(3):
            await publish_new(b, pool, tenant, sid)
        assert await col.wait_for(10) == list(range(1, 11))
        async with asyncio.timeout(10):
            while not b.connected:
                await asyncio.sleep(0.02)
        await publish_new(b, pool, tenant, sid)  # live again, through the proxy
        assert await col.wait_for(11) == list(range(1, 12))
        assert proxy.accepted >= 2  # the bus reconnected
        assert seqs(col.got) == list(range(1, 12))  # and nothing came twice
    finally:
        await col.stop()
        await b.close()
        await client.aclose()
        await proxy.stop()


async def test_cut_off_subscriber_catches_up_only_after_restore(
    pool: asyncpg.Pool, redis_url: str, redis_prefix: str, session: tuple[str, str]
) -> None:
    """Events published during the cut-off and after it come out as one ordered run."""
    tenant, sid = session
    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    proxy = await TcpProxy(host, int(port)).start()
    client = fast_failing_client(proxy.url)
    b = Bus(client, pool, redis_prefix, options=OUTAGE)
    try:
        it = b.subscribe(tenant_id=tenant, session_id=sid)
        await publish_new(b, pool, tenant, sid)
        assert seqs(await take(it, 1)) == [1]
        proxy.sever()
        for _ in range(4):
            await publish_new(b, pool, tenant, sid)
        proxy.restore()
        for _ in range(4):
            await publish_new(b, pool, tenant, sid)
        assert seqs(await take(it, 8)) == list(range(2, 10))
        assert await nothing_more(it)
    finally:
        await b.close()
        await client.aclose()
        await proxy.stop()


async def test_redis_restart(
    pool: asyncpg.Pool, redis_prefix: str, session: tuple[str, str]
) -> None:
    tenant, sid = session
    server = PrivateRedis()
    await server.start()
    client = fast_failing_client(server.url)
    b = Bus(client, pool, redis_prefix, options=OUTAGE)
    col = Collector(b.subscribe(tenant_id=tenant, session_id=sid))
    try:
        await publish_new(b, pool, tenant, sid)
        assert await col.wait_for(1) == [1]

        await server.stop()
        for _ in range(3):
            await publish_new(b, pool, tenant, sid)
        assert await col.wait_for(4) == [1, 2, 3, 4]  # by polling while Redis is gone
        await server.start()  # same port, empty server: the bus must subscribe again
        async with asyncio.timeout(10):
            while not b.connected:
                await asyncio.sleep(0.02)
        for _ in range(3):
            await publish_new(b, pool, tenant, sid)
        assert await col.wait_for(7) == list(range(1, 8))
        counts = await client.pubsub_numsub(channel_name(redis_prefix, sid))
        assert counts[0][1] == 1
    finally:
        await col.stop()
        await b.close()
        await client.aclose()
        await server.stop()


async def test_slow_consumer_gets_everything_and_does_not_hold_back_others(
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    redis_prefix: str,
    session: tuple[str, str],
) -> None:
    tenant, sid = session
    n = 60
    b = Bus(redis_client, pool, redis_prefix, queue_size=4, options=NO_IDLE)
    try:
        await commit_event(pool, tenant, sid)
        slow = b.subscribe(tenant_id=tenant, session_id=sid)
        fast = b.subscribe(tenant_id=tenant, session_id=sid)
        assert seqs(await take(slow, 1)) == [1]
        assert seqs(await take(fast, 1)) == [1]

        fast_got: list[EventRecord] = []

        async def read_fast() -> None:
            fast_got.extend(await take(fast, n))

        reader = asyncio.create_task(read_fast())
        # The slow consumer reads nothing while all of this is published.
        for _ in range(n):
            await publish_new(b, pool, tenant, sid)
        await asyncio.wait_for(reader, 10)
        assert seqs(fast_got) == list(range(2, n + 2))
        assert b.lag_events >= 1  # the slow queue (4) overflowed and was dropped

        slow_got = await take(slow, n)
        assert seqs(slow_got) == list(range(2, n + 2))
        assert await nothing_more(slow, 0.2)
        assert await nothing_more(fast, 0.1)
    finally:
        await b.close()


async def test_many_subscribers_on_a_small_pool(
    redis_client: aioredis.Redis,
    database_url: str,
    redis_prefix: str,
    pool: asyncpg.Pool,
    session: tuple[str, str],
) -> None:
    """200 subscribers of one session, one Redis subscription, 3 database connections."""
    tenant, sid = session
    await commit_event(pool, tenant, sid)
    small = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
    b = Bus(redis_client, small, redis_prefix, options=FAST)
    try:
        subs = [b.subscribe(tenant_id=tenant, session_id=sid) for _ in range(200)]
        firsts = await asyncio.gather(*(take(s, 1) for s in subs))
        assert all(seqs(f) == [1] for f in firsts)
        counts = await redis_client.pubsub_numsub(channel_name(redis_prefix, sid))
        assert counts[0][1] == 1
        for _ in range(20):
            await publish_new(b, pool, tenant, sid)
        results = await asyncio.gather(*(take(s, 20) for s in subs))
        assert all(seqs(r) == list(range(2, 22)) for r in results)
    finally:
        await b.close()
        await small.close()


async def test_close_ends_subscriptions(
    redis_client: aioredis.Redis, pool: asyncpg.Pool, redis_prefix: str, session: tuple[str, str]
) -> None:
    tenant, sid = session
    b = Bus(redis_client, pool, redis_prefix, options=FAST)
    await commit_event(pool, tenant, sid)
    it = b.subscribe(tenant_id=tenant, session_id=sid)
    assert seqs(await take(it, 1)) == [1]
    pending = asyncio.ensure_future(anext(it))
    await asyncio.sleep(0)
    await b.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 5)
    with pytest.raises(RuntimeError):
        b.subscribe(tenant_id=tenant, session_id=sid)


async def test_publish_swallows_redis_failure(
    pool: asyncpg.Pool, redis_prefix: str, session: tuple[str, str]
) -> None:
    tenant, sid = session
    from tests.support.redis_server import free_port

    client = fast_failing_client(f"redis://127.0.0.1:{free_port()}/0")
    b = Bus(client, pool, redis_prefix, options=OUTAGE)
    try:
        record = await commit_event(pool, tenant, sid)
        await b.publish(record)  # must not raise
        # Redis never reachable: the subscriber still gets everything from PostgreSQL.
        it = b.subscribe(tenant_id=tenant, session_id=sid)
        assert seqs(await take(it, 1)) == [1]
        await publish_new(b, pool, tenant, sid)
        assert seqs(await take(it, 1)) == [2]
    finally:
        await b.close()
        await client.aclose()


async def test_reordered_publishes_are_delivered_in_order_without_back_fill(
    redis_client: aioredis.Redis,
    pool: asyncpg.Pool,
    redis_prefix: str,
    session: tuple[str, str],
) -> None:
    """Publishers race; the bus puts live messages back in order itself.

    The records are published but never committed, so only the live path can deliver
    them: a gap back-fill from PostgreSQL would find nothing and seq 2 would be lost.
    """
    tenant, sid = session
    b = Bus(redis_client, pool, redis_prefix, options=NO_IDLE)
    col = Collector(b.subscribe(tenant_id=tenant, session_id=sid))
    try:
        async with asyncio.timeout(10):
            while not b.connected:
                await asyncio.sleep(0.02)
        first = replace(await commit_event(pool, tenant, sid), seq=1)
        await b.publish(first)
        assert await col.wait_for(1) == [1]
        await b.publish(replace(first, seq=3))
        await b.publish(replace(first, seq=2))
        assert await col.wait_for(3) == [1, 2, 3]
    finally:
        await col.stop()
        await b.close()
