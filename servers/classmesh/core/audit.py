"""The audit log: one insert every service uses (removals, ends, moderation, recordings)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg

__all__ = ["insert_audit"]


async def insert_audit(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    session_id: str | None,
    actor_id: str,
    actor_role: str,
    action: str,
    target_type: str | None = None,
    target_id: str | None = None,
    reason: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> None:
    """Append one audit row inside the caller's transaction (commits with the change).

    `session_id` None is a tenant-level entry (API keys, webhooks, tenant settings).
    """
    await conn.execute(
        "INSERT INTO audit_logs (tenant_id, session_id, actor_id, actor_role, action, "
        "target_type, target_id, reason, metadata, request_id) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10)",
        uuid.UUID(tenant_id),
        uuid.UUID(session_id) if session_id else None,
        actor_id[:255],
        actor_role,
        action,
        target_type,
        target_id,
        reason or None,
        dict(metadata or {}),
        request_id or None,
    )
