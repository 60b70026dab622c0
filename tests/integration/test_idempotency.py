"""Idempotency keys: one effect per request_id under concurrency, reuse detection, expiry."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from classmesh.core import idempotency
from classmesh.core.db import transaction
from classmesh.core.events import append_event, read_events
from classmesh.core.idempotency import (
    IdempotencyKeyInProgress,
    IdempotencyKeyReused,
    InvalidRequestId,
    begin,
    fingerprint,
    finish,
    purge_expired,
)
from tests.support.db import insert_session, insert_tenant

METHOD = "/classmesh.interaction.v1.InteractionService/SendChatMessage"


async def send_chat(
    pool: asyncpg.Pool,
    *,
    tenant_id: str,
    session_id: str,
    request_id: str,
    body: str,
    method: str = METHOD,
) -> bytes:
    """The shape every mutating RPC follows: begin, effect + event, finish, one transaction."""
    fp = fingerprint(method, json.dumps({"session_id": session_id, "body": body}).encode())
    async with transaction(pool) as conn:
        stored = await begin(
            conn, tenant_id=tenant_id, request_id=request_id, method=method, fingerprint=fp
        )
        if stored is not None:
            return stored
        event = await append_event(
            conn,
            tenant_id=tenant_id,
            session_id=session_id,
            type="chat_message_posted",
            payload={"body": body},
            request_id=request_id,
        )
        # a real response carries fresh values (ids, times), so a replay must be the stored one
        response = json.dumps(
            {"seq": event.seq, "id": str(uuid.uuid4()), "at": event.created_at.isoformat()}
        ).encode()
        await finish(conn, tenant_id=tenant_id, request_id=request_id, response=response)
    return response


async def test_twenty_concurrent_repeats_have_one_effect(pool: asyncpg.Pool) -> None:
    tenant_id = await insert_tenant(pool)
    session_id = await insert_session(pool, tenant_id)
    responses = await asyncio.gather(
        *(
            send_chat(
                pool, tenant_id=tenant_id, session_id=session_id, request_id="req-1", body="hello"
            )
            for _ in range(20)
        )
    )
    assert len(responses) == 20
    assert len(set(responses)) == 1
    events = await read_events(pool, tenant_id=tenant_id, session_id=session_id)
    assert [(e.seq, e.request_id) for e in events] == [(1, "req-1")]
    assert json.loads(responses[0])["seq"] == 1
    # and a later repeat still gets the same bytes
    again = await send_chat(
        pool, tenant_id=tenant_id, session_id=session_id, request_id="req-1", body="hello"
    )
    assert again == responses[0]


async def test_same_key_different_request_is_rejected(pool: asyncpg.Pool) -> None:
    tenant_id = await insert_tenant(pool)
    session_id = await insert_session(pool, tenant_id)
    first = await send_chat(
        pool, tenant_id=tenant_id, session_id=session_id, request_id="req-2", body="hello"
    )
    with pytest.raises(IdempotencyKeyReused) as err:
        await send_chat(
            pool, tenant_id=tenant_id, session_id=session_id, request_id="req-2", body="bye"
        )
    assert err.value.request_id == "req-2"
    with pytest.raises(IdempotencyKeyReused) as err:
        await send_chat(
            pool,
            tenant_id=tenant_id,
            session_id=session_id,
            request_id="req-2",
            body="hello",
            method="/classmesh.interaction.v1.InteractionService/AskQuestion",
        )
    assert err.value.stored_method == METHOD
    # the rejected attempts changed nothing
    events = await read_events(pool, tenant_id=tenant_id, session_id=session_id)
    assert len(events) == 1
    same = await send_chat(
        pool, tenant_id=tenant_id, session_id=session_id, request_id="req-2", body="hello"
    )
    assert same == first


async def test_expired_key_is_reusable(pool: asyncpg.Pool) -> None:
    tenant_id = await insert_tenant(pool)
    session_id = await insert_session(pool, tenant_id)
    old = await send_chat(
        pool, tenant_id=tenant_id, session_id=session_id, request_id="req-3", body="old"
    )
    await pool.execute(
        "UPDATE idempotency_keys SET created_at = now() - interval '25 hours', "
        "expires_at = now() - interval '1 hour' WHERE tenant_id = $1 AND request_id = 'req-3'",
        uuid.UUID(tenant_id),
    )
    # Another body under the expired key is a fresh request, not a reuse. (It goes to another
    # session: session_events keeps (session_id, request_id) unique for ever.)
    other_session = await insert_session(pool, tenant_id)
    new = await send_chat(
        pool, tenant_id=tenant_id, session_id=other_session, request_id="req-3", body="new"
    )
    assert new != old
    assert len(await read_events(pool, tenant_id=tenant_id, session_id=other_session)) == 1
    row = await pool.fetchrow(
        "SELECT response, expires_at > now() + interval '23 hours' AS fresh "
        "FROM idempotency_keys WHERE tenant_id = $1 AND request_id = 'req-3'",
        uuid.UUID(tenant_id),
    )
    assert row is not None and row["response"] == new and row["fresh"]
    again = await send_chat(
        pool, tenant_id=tenant_id, session_id=other_session, request_id="req-3", body="new"
    )
    assert again == new


async def send_chat_without_event(
    pool: asyncpg.Pool, tenant_id: str, request_id: str, response: bytes
) -> bytes:
    fp = fingerprint(METHOD, b"other body")
    async with transaction(pool) as conn:
        stored = await begin(
            conn, tenant_id=tenant_id, request_id=request_id, method=METHOD, fingerprint=fp
        )
        if stored is not None:
            return stored
        await finish(conn, tenant_id=tenant_id, request_id=request_id, response=response)
    return response


async def test_tenants_do_not_collide(pool: asyncpg.Pool) -> None:
    tenant_a = await insert_tenant(pool)
    tenant_b = await insert_tenant(pool)
    session_a = await insert_session(pool, tenant_a)
    session_b = await insert_session(pool, tenant_b)
    a = await send_chat(pool, tenant_id=tenant_a, session_id=session_a, request_id="k", body="x")
    b = await send_chat(pool, tenant_id=tenant_b, session_id=session_b, request_id="k", body="y")
    assert a != b
    for tenant_id, session_id in ((tenant_a, session_a), (tenant_b, session_b)):
        assert len(await read_events(pool, tenant_id=tenant_id, session_id=session_id)) == 1


async def test_failed_attempt_stores_nothing_and_can_be_retried(pool: asyncpg.Pool) -> None:
    tenant_id = await insert_tenant(pool)
    fp = fingerprint(METHOD, b"body")

    class DomainError(Exception):
        pass

    with pytest.raises(DomainError):
        async with transaction(pool) as conn:
            assert (
                await begin(
                    conn, tenant_id=tenant_id, request_id="r", method=METHOD, fingerprint=fp
                )
                is None
            )
            raise DomainError
    async with transaction(pool) as conn:
        assert (
            await begin(conn, tenant_id=tenant_id, request_id="r", method=METHOD, fingerprint=fp)
            is None
        )
        await finish(conn, tenant_id=tenant_id, request_id="r", response=b"ok")


async def test_key_committed_without_response_is_in_progress(pool: asyncpg.Pool) -> None:
    tenant_id = await insert_tenant(pool)
    fp = fingerprint(METHOD, b"body")
    async with transaction(pool) as conn:
        await begin(conn, tenant_id=tenant_id, request_id="r", method=METHOD, fingerprint=fp)
    with pytest.raises(IdempotencyKeyInProgress):
        async with transaction(pool) as conn:
            await begin(conn, tenant_id=tenant_id, request_id="r", method=METHOD, fingerprint=fp)


async def test_misuse_is_refused(pool: asyncpg.Pool) -> None:
    tenant_id = await insert_tenant(pool)
    fp = fingerprint(METHOD, b"body")
    async with transaction(pool) as conn:
        for bad in ("", "x" * 129):
            with pytest.raises(InvalidRequestId):
                await begin(
                    conn, tenant_id=tenant_id, request_id=bad, method=METHOD, fingerprint=fp
                )
        with pytest.raises(ValueError):
            await begin(
                conn,
                tenant_id=tenant_id,
                request_id="r",
                method=METHOD,
                fingerprint=fp,
                ttl_hours=1,
            )
        with pytest.raises(RuntimeError):
            await finish(conn, tenant_id=tenant_id, request_id="never-begun", response=b"")
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError):
            await begin(conn, tenant_id=tenant_id, request_id="r", method=METHOD, fingerprint=fp)
    # 128 characters is the longest allowed key
    async with transaction(pool) as conn:
        assert (
            await begin(
                conn, tenant_id=tenant_id, request_id="y" * 128, method=METHOD, fingerprint=fp
            )
            is None
        )


async def test_purge_expired_removes_only_expired_keys(pool: asyncpg.Pool) -> None:
    tenant_id = await insert_tenant(pool)
    fp = fingerprint(METHOD, b"body")
    for i in range(7):
        await pool.execute(
            "INSERT INTO idempotency_keys (tenant_id, request_id, method, fingerprint, response, "
            "created_at, expires_at) VALUES ($1, $2, $3, $4, 'r', now() - interval '2 days', "
            "now() - interval '1 day')",
            uuid.UUID(tenant_id),
            f"old-{i}",
            METHOD,
            fp,
        )
    await send_chat_without_event(pool, tenant_id, "live", b"kept")
    assert await purge_expired(pool) >= 7
    left = await pool.fetch(
        "SELECT request_id FROM idempotency_keys WHERE tenant_id = $1", uuid.UUID(tenant_id)
    )
    assert [r["request_id"] for r in left] == ["live"]


def test_module_exports() -> None:
    assert set(idempotency.__all__) <= set(dir(idempotency))
