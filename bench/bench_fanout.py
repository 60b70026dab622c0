"""Bus fan-out: one publisher, N subscribers of one session in one process, vs raw Redis.

For N = 100, 500, 1000, two implementations with the same consumers (N asyncio tasks that
take the time of receipt of every event):

* bus   `classmesh.core.bus.Bus`: each subscriber iterates `Bus.subscribe()` (replay from
        PostgreSQL, then live); the publisher calls `Bus.publish` with committed records
        (the clock starts just before publish). The warm-up events go through
        `append_event`; the measured ones are inserted into `session_events` in bulk before
        the clock starts, without moving `sessions.last_seq` (so the bus watcher never sees a
        subscriber "behind" and reads ahead): a lagging subscriber's re-read still finds
        every row. The publisher's own transaction is bench_eventlog's subject; the row
        `bus+append` shows it anyway: one publisher doing append_event + commit +
        Bus.publish per message, as a mutation does (closed loop only);
* raw   the raw limit: one redis-py pub/sub connection whose reader decodes each message
        once (json) and puts it into N in-process `asyncio.Queue`s; the publisher only
        publishes the same JSON (no database).

Two loads per (N, implementation):

* max   closed loop: message k is published once every subscriber has received k - 4
        (never more than 4 messages in flight, so no queue overflows): the sustainable
        delivered events/s, and the latency at that rate;
* 5k/s  open loop at 5,000 offered deliveries/s (5,000 / N messages per second): p95
        end-to-end latency below saturation.

Latency = publish call -> the subscriber task has the event. The gRPC stream hop (server
streaming to remote clients) is out of scope: no stream RPC exists yet.
Run: .venv/bin/python bench/bench_fanout.py
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import redis.asyncio as aioredis
from _common import (
    REDIS_URL,
    percentile,
    print_json,
    print_table,
    ratio,
    redis_prefix,
    throwaway_database,
)

from classmesh.core.bus import Bus, channel_name
from classmesh.core.db import create_pool, transaction
from classmesh.core.events import EventRecord, append_event

ROOM_SIZES = (100, 500, 1000)
WINDOW = 4  # closed loop: messages in flight
OFFERED = 5_000  # open loop: deliveries per second
MAX_S = 3.0
OPEN_S = 3.0
WARMUP_MESSAGES = 2
TEXT = "Could you repeat the last slide?"
ACTOR = {"user_id": "teacher-1", "role": "instructor"}
DRAIN_S = 5.0


@dataclass
class Tracker:
    """Shared between publisher and subscribers: publish times and per-message receipts."""

    n: int
    published: dict[int, float] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)
    complete: dict[int, asyncio.Event] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    in_window: int = 0
    measure_from: int = WARMUP_MESSAGES + 1
    early: int = 0

    def done(self, seq: int) -> asyncio.Event:
        ev = self.complete.get(seq)
        if ev is None:
            ev = self.complete[seq] = asyncio.Event()
        return ev

    def got(self, seq: int) -> None:
        now = time.perf_counter()
        count = self.received.get(seq, 0) + 1
        self.received[seq] = count
        if count == self.n:
            self.done(seq).set()
        published = self.published.get(seq)
        if published is None:
            # Read from PostgreSQL before it was published (a lagging subscriber's
            # catch-up): delivered, but it has no publish-to-receipt latency.
            self.early += 1
        elif seq >= self.measure_from:
            self.latencies.append(now - published)
            if self.window[0] <= now < self.window[1]:
                self.in_window += 1


@dataclass
class Figure:
    impl: str
    n: int
    load: str
    delivered_per_s: float
    p50_ms: float
    p95_ms: float
    messages: int
    deliveries: int
    missing: int


Publish = Callable[[int], Awaitable[None]]


async def run_load(
    impl: str, n: int, load: str, tracker: Tracker, publish: Publish, first_seq: int
) -> tuple[Figure, int]:
    """Publish from `first_seq` under `load`; returns the figure and the next seq."""
    seq = first_seq
    start = time.perf_counter()
    duration = MAX_S if load == "max" else OPEN_S
    tracker.window = (start, start + duration)
    tracker.in_window = 0
    tracker.latencies = []
    tracker.measure_from = first_seq
    interval = n / OFFERED
    while time.perf_counter() < start + duration:
        if load == "max":
            if seq - WINDOW >= first_seq:
                await tracker.done(seq - WINDOW).wait()
        else:
            due = start + (seq - first_seq) * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await publish(seq)
        seq += 1
    last = seq - 1
    # Let what was published arrive (counts only toward latency, not the window rate).
    try:
        async with asyncio.timeout(DRAIN_S):
            await tracker.done(last).wait()
    except TimeoutError:
        pass
    expected = (last - first_seq + 1) * n
    got = sum(tracker.received.get(s, 0) for s in range(first_seq, last + 1))
    lat = sorted(tracker.latencies)
    figure = Figure(
        impl=impl,
        n=n,
        load=load if load == "max" else f"{OFFERED // 1000}k/s",
        delivered_per_s=tracker.in_window / duration,
        p50_ms=percentile(lat, 50) * 1000,
        p95_ms=percentile(lat, 95) * 1000,
        messages=last - first_seq + 1,
        deliveries=got,
        missing=expected - got,
    )
    return figure, seq


# ----------------------------------------------------------------------------- ClassMesh Bus


async def new_session(pool: asyncpg.Pool, tenant_id: str) -> str:
    start = datetime.now(UTC) + timedelta(hours=1)
    value = await pool.fetchval(
        "INSERT INTO sessions (tenant_id, title, instructor_id, scheduled_start, scheduled_end, "
        "join_link_token) VALUES ($1, 'bench', 'teacher-1', $2, $3, $4) RETURNING id",
        uuid.UUID(tenant_id),
        start,
        start + timedelta(hours=1),
        secrets.token_hex(32),
    )
    return str(value)


async def bench_bus(
    pool: asyncpg.Pool, bus: Bus, tenant_id: str, n: int, *, with_append: bool = False
) -> list[Figure]:
    session_id = await new_session(pool, tenant_id)
    tracker = Tracker(n)

    async def consume() -> None:
        stream = bus.subscribe(tenant_id=tenant_id, session_id=session_id, after_seq=0)
        async for record in stream:
            tracker.got(record.seq)

    async def append(seq: int) -> None:
        async with transaction(pool) as conn:
            record = await append_event(
                conn,
                tenant_id=tenant_id,
                session_id=session_id,
                type="chat_message_posted",
                payload={"message_id": f"m{seq}", "text": TEXT},
                actor=ACTOR,
            )
        assert record.seq == seq
        tracker.published[seq] = time.perf_counter()
        await bus.publish(record)

    # Measured events are committed in bulk before the clock starts (see the docstring):
    # the publisher then only calls Bus.publish, like the raw publisher.
    first = WARMUP_MESSAGES + 1
    count = int(350_000 * MAX_S / n) + int(OFFERED * OPEN_S / n) + 100
    created = datetime.now(UTC)
    records = {
        seq: EventRecord(
            tenant_id=tenant_id,
            session_id=session_id,
            seq=seq,
            type="chat_message_posted",
            payload={"message_id": f"m{seq}", "text": TEXT},
            created_at=created,
            actor=ACTOR,
        )
        for seq in range(first, first + count)
    }

    async def publish(seq: int) -> None:
        record = records[seq]
        tracker.published[seq] = time.perf_counter()
        await bus.publish(record)

    tasks = [asyncio.create_task(consume()) for _ in range(n)]
    try:
        # Warm-up: every subscriber has replayed and receives live before the clock starts.
        for seq in range(1, WARMUP_MESSAGES + 1):
            await append(seq)
        async with asyncio.timeout(30):
            await tracker.done(WARMUP_MESSAGES).wait()
        if with_append:
            # The production path: each message is a mutation (append + commit) + publish.
            figure, _ = await run_load("bus+append", n, "max", tracker, append, first)
            return [figure]
        await pool.executemany(
            "INSERT INTO session_events "
            "(tenant_id, session_id, seq, type, payload, actor, created_at) "
            "VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7)",
            [
                (
                    uuid.UUID(tenant_id),
                    uuid.UUID(session_id),
                    r.seq,
                    r.type,
                    json.dumps(r.payload),
                    json.dumps(r.actor),
                    r.created_at,
                )
                for r in records.values()
            ],
        )
        figures = []
        seq = WARMUP_MESSAGES + 1
        for load in ("max", "open"):
            figure, seq = await run_load("bus", n, load, tracker, publish, seq)
            figures.append(figure)
        return figures
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ----------------------------------------------------------------------------- raw Redis


async def bench_raw(redis: aioredis.Redis, prefix: str, tenant_id: str, n: int) -> list[Figure]:
    session_id = str(uuid.uuid4())
    channel = channel_name(prefix, session_id)
    tracker = Tracker(n)
    queues: list[asyncio.Queue[int]] = [asyncio.Queue(maxsize=1024) for _ in range(n)]
    dropped = 0
    subscribed = asyncio.Event()
    pubsub = redis.pubsub()

    async def reader() -> None:
        nonlocal dropped
        await pubsub.subscribe(channel)
        async for message in pubsub.listen():
            if message["type"] == "subscribe":
                subscribed.set()
            elif message["type"] == "message":
                seq = int(json.loads(message["data"])["seq"])
                for q in queues:
                    try:
                        q.put_nowait(seq)
                    except asyncio.QueueFull:
                        dropped += 1

    async def consume(q: asyncio.Queue[int]) -> None:
        while True:
            tracker.got(await q.get())

    template = EventRecord(
        tenant_id=tenant_id,
        session_id=session_id,
        seq=0,
        type="chat_message_posted",
        payload={"message_id": "m0", "text": "Could you repeat the last slide?"},
        created_at=datetime.now(UTC),
        actor={"user_id": "teacher-1", "role": "instructor"},
    )

    async def publish(seq: int) -> None:
        body = json.loads(template.to_json())
        body["seq"] = seq
        body["payload"]["message_id"] = f"m{seq}"
        data = json.dumps(body, separators=(",", ":"))
        tracker.published[seq] = time.perf_counter()
        await redis.publish(channel, data)

    tasks = [asyncio.create_task(consume(q)) for q in queues]
    tasks.append(asyncio.create_task(reader()))
    try:
        async with asyncio.timeout(10):
            await subscribed.wait()
        for seq in range(1, WARMUP_MESSAGES + 1):
            await publish(seq)
        async with asyncio.timeout(30):
            await tracker.done(WARMUP_MESSAGES).wait()
        figures = []
        seq = WARMUP_MESSAGES + 1
        for load in ("max", "open"):
            figure, seq = await run_load("raw", n, load, tracker, publish, seq)
            figures.append(figure)
        if dropped:
            print(f"raw n={n}: {dropped} deliveries dropped (queue full)")
        return figures
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pubsub.aclose()


async def main() -> int:
    figures: list[Figure] = []
    lagged = 0
    async with throwaway_database() as dsn:
        pool = await create_pool(dsn, max_size=20)
        redis = aioredis.from_url(REDIS_URL)
        prefix = redis_prefix("fanout")
        bus = Bus(redis=redis, pool=pool, prefix=prefix, queue_size=1024)
        try:
            tenant_id = str(
                await pool.fetchval(
                    "INSERT INTO tenants (name) VALUES ($1) RETURNING id",
                    f"bench-{secrets.token_hex(6)}",
                )
            )
            for n in ROOM_SIZES:
                figures += await bench_raw(redis, prefix, tenant_id, n)
                figures += await bench_bus(pool, bus, tenant_id, n)
                figures += await bench_bus(pool, bus, tenant_id, n, with_append=True)
            lagged = bus.lag_events
        finally:
            await bus.close()
            await redis.aclose()
            await pool.close()

    print_table(
        "fan-out in one process (delivered = events received by subscriber tasks)",
        ["impl", "N", "load", "delivered/s", "p50 ms", "p95 ms", "messages", "missing"],
        [
            (f.impl, f.n, f.load, f.delivered_per_s, f.p50_ms, f.p95_ms, f.messages, f.missing)
            for f in figures
        ],
    )
    by = {(f.impl, f.n, f.load): f for f in figures}
    open_load = f"{OFFERED // 1000}k/s"
    rows = []
    ratios: dict[str, float] = {}
    for n in ROOM_SIZES:
        bus_max, raw_max = by["bus", n, "max"], by["raw", n, "max"]
        bus_open, raw_open = by["bus", n, open_load], by["raw", n, open_load]
        r_rate = ratio(bus_max.delivered_per_s, raw_max.delivered_per_s)
        r_p95 = ratio(raw_open.p95_ms, bus_open.p95_ms)
        ratios[f"max_delivered@{n}"] = r_rate
        ratios[f"p95_at_{open_load}@{n}(raw/bus)"] = r_p95
        app = by["bus+append", n, "max"]
        r_app = ratio(app.delivered_per_s, raw_max.delivered_per_s)
        ratios[f"append_path_max_delivered@{n}"] = r_app
        rows.append((n, bus_max.delivered_per_s, raw_max.delivered_per_s, r_rate, r_p95, r_app))
    print_table(
        "ratios (bus / raw delivered events/s at max; raw p95 / bus p95 at the open load)",
        ["N", "bus max/s", "raw max/s", "ratio", f"p95 ratio @{open_load}", "bus+append/raw"],
        rows,
    )
    print(f"bus subscribers that lagged (queue overflow -> PostgreSQL re-read): {lagged}")
    print("gRPC stream hop: out of scope (no server-streaming RPC exists yet); in-process only.")
    print_json(
        "fanout",
        {
            "figures": [asdict(f) for f in figures],
            "ratios": ratios,
            "bus_lag_events": lagged,
            "grpc_stream_hop": "out of scope: no stream RPC exists yet",
        },
    )
    return 1 if any(f.deliveries == 0 for f in figures) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
