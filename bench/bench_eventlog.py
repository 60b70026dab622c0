"""Event log throughput: `append_event` / `read_events` vs raw asyncpg on the same server.

Writes (50 concurrent writers, one pool of 20 connections each, fresh migrated database):

* append 1 session     each write = `transaction(pool)` + `append_event` on ONE session
                       (every writer queues on that session's row lock: the hot-room case);
* append 100 sessions  the same spread over 100 sessions (writer w, write n -> session
                       (w + n) % 100);
* raw insert           the raw limit: one autocommitted single-row INSERT into a plain table
                       (bigserial key, uuid, jsonb) per write, plain asyncpg pool;
* raw tx 1 / 100       reference: the same two statements append_event runs (UPDATE ...
                       RETURNING + INSERT) hand-written in one transaction on a plain pool,
                       so the gap between it and `append` is our Python, the gap between it
                       and `raw insert` is the design (row lock + two statements + commit).

Reads: page through one session of 20,000 events from seq 0 with `read_events` (limit 500,
the bus's page) by 1 and by 16 concurrent readers, vs the same SELECT on a plain pool
returning raw rows (jsonb as text, no EventRecord): events/s.

Ratios are ClassMesh / raw insert (writes) and ClassMesh / raw select (reads).
Run: .venv/bin/python bench/bench_eventlog.py
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from _common import percentile, print_json, print_table, ratio, throwaway_database

from classmesh.core.db import create_pool, transaction
from classmesh.core.events import append_event, read_events

WRITERS = 50
POOL_SIZE = 20  # Config.db_pool_size default
WARMUP_S = 0.5
MEASURE_S = 2.5
READ_EVENTS = 20_000
READ_PAGE = 500


@dataclass
class Figure:
    case: str
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    ops: int
    errors: int
    spread: str = ""


async def measure(case: str, workers: int, op: Callable[[int, int], Awaitable[int]]) -> Figure:
    """`workers` loops call op(worker, n) back to back; ops that start in the window count.

    `op` returns how many units it did (events read, rows written), summed for ops/s.
    """
    latencies: list[float] = []
    units = 0
    errors = 0
    start = time.perf_counter()
    window_start, window_end = start + WARMUP_S, start + WARMUP_S + MEASURE_S

    async def loop(w: int) -> None:
        nonlocal units, errors
        n = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= window_end:
                return
            try:
                done = await op(w, n)
            except Exception:  # noqa: BLE001 - counted and shown, the run goes on
                errors += 1
                n += 1
                continue
            n += 1
            if t0 >= window_start:
                latencies.append(time.perf_counter() - t0)
                units += done

    await asyncio.gather(*(loop(w) for w in range(workers)))
    latencies.sort()
    return Figure(
        case=case,
        ops_per_s=units / MEASURE_S,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        ops=len(latencies),
        errors=errors,
    )


async def new_tenant(pool: asyncpg.Pool) -> str:
    value = await pool.fetchval(
        "INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"bench-{secrets.token_hex(6)}"
    )
    return str(value)


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


def mean_figure(case: str, runs: list[Figure]) -> Figure:
    n = len(runs)
    return Figure(
        case=case,
        ops_per_s=sum(r.ops_per_s for r in runs) / n,
        p50_ms=sum(r.p50_ms for r in runs) / n,
        p99_ms=sum(r.p99_ms for r in runs) / n,
        ops=sum(r.ops for r in runs),
        errors=sum(r.errors for r in runs),
        spread=f"{min(r.ops_per_s for r in runs):,.0f}-{max(r.ops_per_s for r in runs):,.0f}",
    )


def payload(w: int, n: int) -> dict[str, object]:
    return {"message_id": f"m-{w}-{n}", "text": "Could you repeat the last slide?", "w": w}


def actor(w: int) -> dict[str, str]:
    return {"user_id": f"student-{w}", "role": "student", "name": f"Student {w}"}


async def main() -> int:
    figures: list[Figure] = []
    async with throwaway_database() as dsn:
        pool = await create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE)
        raw = await asyncpg.create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE)
        assert raw is not None
        try:
            tenant = await new_tenant(pool)
            hot = await new_session(pool, tenant)
            spread = [await new_session(pool, tenant) for _ in range(100)]
            t_uuid = uuid.UUID(tenant)

            async def append_hot(w: int, n: int) -> int:
                async with transaction(pool) as conn:
                    await append_event(
                        conn,
                        tenant_id=tenant,
                        session_id=hot,
                        type="chat_message_posted",
                        payload=payload(w, n),
                        actor=actor(w),
                    )
                return 1

            async def append_spread(w: int, n: int) -> int:
                async with transaction(pool) as conn:
                    await append_event(
                        conn,
                        tenant_id=tenant,
                        session_id=spread[(w + n) % 100],
                        type="chat_message_posted",
                        payload=payload(w, n),
                        actor=actor(w),
                    )
                return 1

            await raw.execute(
                "CREATE TABLE bench_raw (id bigserial PRIMARY KEY, session_id uuid NOT NULL, "
                "payload jsonb NOT NULL)"
            )
            raw_session = uuid.UUID(hot)

            async def raw_insert(w: int, n: int) -> int:
                await raw.execute(
                    "INSERT INTO bench_raw (session_id, payload) VALUES ($1, $2::jsonb)",
                    raw_session,
                    json.dumps(payload(w, n)),
                )
                return 1

            # Separate sessions for the hand-written transaction, so seqs never collide.
            raw_hot = uuid.UUID(await new_session(pool, tenant))
            raw_spread = [uuid.UUID(await new_session(pool, tenant)) for _ in range(100)]

            async def raw_tx(session: uuid.UUID, w: int, n: int) -> int:
                async with raw.acquire() as conn, conn.transaction():
                    seq = await conn.fetchval(
                        "UPDATE sessions SET last_seq = last_seq + 1 "
                        "WHERE id = $1 AND tenant_id = $2 RETURNING last_seq",
                        session,
                        t_uuid,
                    )
                    await conn.execute(
                        "INSERT INTO session_events (tenant_id, session_id, seq, type, "
                        "payload, actor) VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb)",
                        t_uuid,
                        session,
                        seq,
                        "chat_message_posted",
                        json.dumps(payload(w, n)),
                        json.dumps(actor(w)),
                    )
                return 1

            async def raw_tx_hot(w: int, n: int) -> int:
                return await raw_tx(raw_hot, w, n)

            async def raw_tx_spread(w: int, n: int) -> int:
                return await raw_tx(raw_spread[(w + n) % 100], w, n)

            # The database drifts during a run (WAL, autovacuum, the tables grow), so every
            # write case runs twice, in forward then reverse order, and the mean is reported.
            cases: list[tuple[str, Callable[[int, int], Awaitable[int]]]] = [
                ("raw insert", raw_insert),
                ("append 1 session", append_hot),
                ("raw tx 1 session", raw_tx_hot),
                ("append 100 sessions", append_spread),
                ("raw tx 100 sessions", raw_tx_spread),
            ]
            rounds: dict[str, list[Figure]] = {name: [] for name, _ in cases}
            for name, op in [*cases, *reversed(cases)]:
                rounds[name].append(await measure(name, WRITERS, op))
            figures += [mean_figure(name, runs) for name, runs in rounds.items()]

            # ---- reads: one session with READ_EVENTS events, seeded in bulk.
            reader_session = await new_session(pool, tenant)
            r_uuid = uuid.UUID(reader_session)
            rows = [
                (
                    t_uuid,
                    r_uuid,
                    seq,
                    "chat_message_posted",
                    json.dumps(payload(seq % 50, seq)),
                    json.dumps(actor(seq % 50)),
                )
                for seq in range(1, READ_EVENTS + 1)
            ]
            await raw.copy_records_to_table(
                "session_events",
                records=rows,
                columns=["tenant_id", "session_id", "seq", "type", "payload", "actor"],
            )
            await raw.execute(
                "UPDATE sessions SET last_seq = $1 WHERE id = $2", READ_EVENTS, r_uuid
            )
            await raw.execute("ANALYZE session_events")

            # One op = one page; each reader walks the session from seq 0 and wraps around.
            cursors: dict[tuple[str, int], int] = {}

            async def read_page(w: int, _n: int) -> int:
                after = cursors.get(("cm", w), 0)
                page = await read_events(
                    pool,
                    tenant_id=tenant,
                    session_id=reader_session,
                    after_seq=after,
                    limit=READ_PAGE,
                )
                cursors["cm", w] = page[-1].seq if len(page) == READ_PAGE else 0
                return len(page)

            async def raw_read_page(w: int, _n: int) -> int:
                after = cursors.get(("raw", w), 0)
                page = await raw.fetch(
                    "SELECT tenant_id, session_id, seq, type, payload, actor, request_id, "
                    "breakout_room_id, created_at FROM session_events "
                    "WHERE session_id = $1 AND tenant_id = $2 AND seq > $3 "
                    "ORDER BY seq LIMIT $4",
                    r_uuid,
                    t_uuid,
                    after,
                    READ_PAGE,
                )
                cursors["raw", w] = page[-1]["seq"] if len(page) == READ_PAGE else 0
                return len(page)

            figures.append(await measure("raw select x1", 1, raw_read_page))
            figures.append(await measure("read_events x1", 1, read_page))
            figures.append(await measure("raw select x16", 16, raw_read_page))
            figures.append(await measure("read_events x16", 16, read_page))
        finally:
            await pool.close()
            await raw.close()

    by = {f.case: f for f in figures}
    raw_insert_rate = by["raw insert"].ops_per_s
    print_table(
        f"event log, {WRITERS} writers (ops = events appended / rows inserted; reads: events/s)",
        ["case", "ops/s", "2 runs", "p50 ms", "p99 ms", "ops", "errors"],
        [(f.case, f.ops_per_s, f.spread, f.p50_ms, f.p99_ms, f.ops, f.errors) for f in figures],
    )
    ratios = {
        "append_1_session/raw_insert": ratio(by["append 1 session"].ops_per_s, raw_insert_rate),
        "append_100_sessions/raw_insert": ratio(
            by["append 100 sessions"].ops_per_s, raw_insert_rate
        ),
        "append_1_session/raw_tx_1": ratio(
            by["append 1 session"].ops_per_s, by["raw tx 1 session"].ops_per_s
        ),
        "append_100_sessions/raw_tx_100": ratio(
            by["append 100 sessions"].ops_per_s, by["raw tx 100 sessions"].ops_per_s
        ),
        "read_events_x1/raw_select_x1": ratio(
            by["read_events x1"].ops_per_s, by["raw select x1"].ops_per_s
        ),
        "read_events_x16/raw_select_x16": ratio(
            by["read_events x16"].ops_per_s, by["raw select x16"].ops_per_s
        ),
    }
    print_table(
        f"ratios (raw insert reference: {raw_insert_rate:,.0f} rows/s, mean of 2 runs)",
        ["ratio", "value"],
        list(ratios.items()),
    )
    print_json(
        "eventlog",
        {
            "figures": [asdict(f) for f in figures],
            "raw_insert_rows_per_s": round(raw_insert_rate, 1),
            "ratios": ratios,
        },
    )
    return 1 if any(f.ops == 0 for f in figures) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
