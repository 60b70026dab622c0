"""Minimal rows for tests that need a tenant, a session and committed events."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from classmesh.core.events import EventRecord, append_event


async def insert_tenant(conn: asyncpg.Connection | asyncpg.Pool) -> str:
    """A new tenant with a unique name; returns its id."""
    tenant_id = await conn.fetchval(
        "INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"t-{secrets.token_hex(6)}"
    )
    return str(tenant_id)


async def insert_session(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, title: str = "Test class"
) -> str:
    """A scheduled session of `tenant_id` starting in an hour; returns its id."""
    start = datetime.now(UTC) + timedelta(hours=1)
    session_id = await conn.fetchval(
        "INSERT INTO sessions (tenant_id, title, instructor_id, scheduled_start, scheduled_end, "
        "join_link_token) VALUES ($1, $2, 'teacher-1', $3, $4, $5) RETURNING id",
        uuid.UUID(tenant_id),
        title,
        start,
        start + timedelta(hours=1),
        secrets.token_hex(32),
    )
    return str(session_id)


async def make_session(pool: asyncpg.Pool) -> tuple[str, str]:
    """Insert a tenant and one of its sessions; return (tenant_id, session_id)."""
    tenant_id = str(uuid.uuid4())
    session_id = str(uuid.uuid4())
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO tenants (id, name) VALUES ($1, $2)",
            uuid.UUID(tenant_id),
            f"test-{tenant_id}",
        )
        await conn.execute(
            "INSERT INTO sessions (id, tenant_id, title, instructor_id, scheduled_start, "
            "scheduled_end, join_link_token) "
            "VALUES ($1, $2, 'Bus test', 'instructor-1', now(), now() + interval '1 hour', $3)",
            uuid.UUID(session_id),
            uuid.UUID(tenant_id),
            secrets.token_urlsafe(48),
        )
    return tenant_id, session_id


async def commit_event(
    pool: asyncpg.Pool,
    tenant_id: str,
    session_id: str,
    type: str = "test.event",
    payload: Mapping[str, Any] | None = None,
) -> EventRecord:
    """Append one event in its own committed transaction."""
    async with pool.acquire() as conn, conn.transaction():
        return await append_event(
            conn,
            tenant_id=tenant_id,
            session_id=session_id,
            type=type,
            payload=payload or {},
        )
