"""Minimal rows for tests that need a tenant, a session and committed events."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg

from classmesh.core.events import EventRecord, append_event


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
