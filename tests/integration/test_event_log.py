"""The event log: gap-free per-session seq under concurrency, rollback, paging, isolation."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from classmesh.core.db import create_pool, transaction
from classmesh.core.events import (
    SessionNotFoundError,
    append_event,
    last_seq,
    read_events,
)
from tests.support.db import insert_session, insert_tenant


async def _append_one(
    pool: asyncpg.Pool, tenant_id: str, session_id: str, writer: int, n: int
) -> int:
    async with transaction(pool) as conn:
        record = await append_event(
            conn,
            tenant_id=tenant_id,
            session_id=session_id,
            type="chat_message_posted",
            payload={"writer": writer, "n": n},
            actor={"user_id": f"w{writer}"},
        )
    return record.seq


async def test_concurrent_appends_are_gap_free(pool: asyncpg.Pool) -> None:
    writers, per_writer = 50, 200
    tenant_id = await insert_tenant(pool)
    session_id = await insert_session(pool, tenant_id)

    async def writer(w: int) -> list[int]:
        return [await _append_one(pool, tenant_id, session_id, w, n) for n in range(per_writer)]

    results = await asyncio.gather(*(writer(w) for w in range(writers)))

    total = writers * per_writer
    for seqs in results:  # each writer saw its own appends in increasing order
        assert seqs == sorted(seqs)
    assert sorted(s for seqs in results for s in seqs) == list(range(1, total + 1))
    rows = await pool.fetch(
        "SELECT seq, payload FROM session_events WHERE session_id = $1 ORDER BY seq",
        uuid.UUID(session_id),
    )
    assert [r["seq"] for r in rows] == list(range(1, total + 1))
    assert await last_seq(pool, tenant_id=tenant_id, session_id=session_id) == total
    # every (writer, n) landed exactly once
    assert len({r["payload"] for r in rows}) == total


async def test_rolled_back_append_leaves_no_event_and_no_hole(pool: asyncpg.Pool) -> None:
    tenant_id = await insert_tenant(pool)
    session_id = await insert_session(pool, tenant_id)
    assert await _append_one(pool, tenant_id, session_id, 0, 0) == 1

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with transaction(pool) as conn:
            record = await append_event(
                conn, tenant_id=tenant_id, session_id=session_id, type="doomed", payload={}
            )
            assert record.seq == 2
            raise Boom

    events = await read_events(pool, tenant_id=tenant_id, session_id=session_id)
    assert [e.seq for e in events] == [1]
    assert await last_seq(pool, tenant_id=tenant_id, session_id=session_id) == 1
    assert await _append_one(pool, tenant_id, session_id, 0, 1) == 2


async def test_read_events_pages_after_seq(pool: asyncpg.Pool) -> None:
    tenant_id = await insert_tenant(pool)
    session_id = await insert_session(pool, tenant_id)
    async with transaction(pool) as conn:
        for i in range(25):
            await append_event(
                conn,
                tenant_id=tenant_id,
                session_id=session_id,
                type="poll_results_changed" if i % 5 == 0 else "chat_message_posted",
                payload={"i": i},
            )

    async def page(after: int, limit: int) -> list[int]:
        events = await read_events(
            pool, tenant_id=tenant_id, session_id=session_id, after_seq=after, limit=limit
        )
        return [e.seq for e in events]

    assert await page(0, 10) == list(range(1, 11))
    assert await page(10, 10) == list(range(11, 21))
    assert await page(20, 10) == list(range(21, 26))
    assert await page(25, 10) == []
    assert await page(24, 0) == [25]  # limit is clamped to at least one
    polls = await read_events(
        pool, tenant_id=tenant_id, session_id=session_id, types=["poll_results_changed"]
    )
    assert [e.seq for e in polls] == [1, 6, 11, 16, 21]
    first = (await read_events(pool, tenant_id=tenant_id, session_id=session_id, limit=1))[0]
    assert first.payload == {"i": 0}
    assert first.type == "poll_results_changed"
    assert first.tenant_id == tenant_id and first.session_id == session_id


async def test_duplicate_request_id_is_rejected(pool: asyncpg.Pool) -> None:
    tenant_id = await insert_tenant(pool)
    session_id = await insert_session(pool, tenant_id)
    async with transaction(pool) as conn:
        await append_event(
            conn, tenant_id=tenant_id, session_id=session_id, type="a", payload={}, request_id="r1"
        )
    with pytest.raises(asyncpg.UniqueViolationError) as err:
        async with transaction(pool) as conn:
            await append_event(
                conn,
                tenant_id=tenant_id,
                session_id=session_id,
                type="b",
                payload={},
                request_id="r1",
            )
    assert err.value.constraint_name == "session_events_session_request_id_key"
    assert await last_seq(pool, tenant_id=tenant_id, session_id=session_id) == 1
    # the same request_id in another session is fine
    other = await insert_session(pool, tenant_id)
    async with transaction(pool) as conn:
        record = await append_event(
            conn, tenant_id=tenant_id, session_id=other, type="a", payload={}, request_id="r1"
        )
    assert record.seq == 1 and record.request_id == "r1"


async def test_unknown_session_and_other_tenant_are_not_found(pool: asyncpg.Pool) -> None:
    tenant_a = await insert_tenant(pool)
    tenant_b = await insert_tenant(pool)
    session_a = await insert_session(pool, tenant_a)
    await _append_one(pool, tenant_a, session_a, 0, 0)

    for tenant_id, session_id in ((tenant_a, str(uuid.uuid4())), (tenant_b, session_a)):
        with pytest.raises(SessionNotFoundError):
            async with transaction(pool) as conn:
                await append_event(
                    conn, tenant_id=tenant_id, session_id=session_id, type="x", payload={}
                )
        with pytest.raises(SessionNotFoundError):
            await last_seq(pool, tenant_id=tenant_id, session_id=session_id)
        assert await read_events(pool, tenant_id=tenant_id, session_id=session_id) == []
    assert await last_seq(pool, tenant_id=tenant_a, session_id=session_a) == 1


async def test_append_outside_a_transaction_is_refused(pool: asyncpg.Pool) -> None:
    tenant_id = await insert_tenant(pool)
    session_id = await insert_session(pool, tenant_id)
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError):
            await append_event(
                conn, tenant_id=tenant_id, session_id=session_id, type="x", payload={}
            )


async def test_event_log_through_the_codec_pool(database_url: str) -> None:
    """core/db.create_pool decodes jsonb to objects; the event log works the same on it."""
    pool = await create_pool(database_url, max_size=2)
    try:
        tenant_id = await insert_tenant(pool)
        session_id = await insert_session(pool, tenant_id)
        async with transaction(pool) as conn:
            record = await append_event(
                conn,
                tenant_id=tenant_id,
                session_id=session_id,
                type="participant_admitted",
                payload={"user_id": "s1", "nested": {"a": [1, 2]}},
                actor={"user_id": "teacher-1", "role": "instructor"},
            )
        assert record.payload == {"user_id": "s1", "nested": {"a": [1, 2]}}
        (event,) = await read_events(pool, tenant_id=tenant_id, session_id=session_id)
        assert event.payload == record.payload
        assert event.actor == {"user_id": "teacher-1", "role": "instructor"}
        raw = await pool.fetchval(
            "SELECT payload FROM session_events WHERE session_id = $1", uuid.UUID(session_id)
        )
        assert raw == {"user_id": "s1", "nested": {"a": [1, 2]}}
        assert (
            await pool.fetchval(
                "SELECT jsonb_typeof(payload) FROM session_events WHERE session_id = $1",
                uuid.UUID(session_id),
            )
            == "object"
        )
        assert await pool.fetchval("SELECT $1::jsonb", {"k": [1]}) == {"k": [1]}
    finally:
        await pool.close()
