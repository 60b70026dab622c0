"""SQL for tenants and API keys. Takes a Connection; the service owns the transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

__all__ = ["ApiKeyRow", "TenantRow", "AdminStore"]


@dataclass(frozen=True, slots=True)
class TenantRow:
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    id: str
    tenant_id: str
    role: str
    description: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    secret_hint: str


def _tenant(r: asyncpg.Record) -> TenantRow:
    return TenantRow(id=str(r["id"]), name=r["name"], created_at=r["created_at"])


def _key(r: asyncpg.Record) -> ApiKeyRow:
    return ApiKeyRow(
        id=r["id"],
        tenant_id=str(r["tenant_id"]),
        role=r["role"],
        description=r["description"],
        created_at=r["created_at"],
        revoked_at=r["revoked_at"],
        last_used_at=r["last_used_at"],
        secret_hint=r["secret_hint"],
    )


_KEY_COLS = (
    "id, tenant_id, role, description, created_at, revoked_at, last_used_at, "
    "right(secret, 4) AS secret_hint"
)


class AdminStore:
    """Queries of the admin service; every query is scoped to a tenant."""

    async def get_tenant(self, conn: asyncpg.Connection, tenant_id: str) -> TenantRow | None:
        r = await conn.fetchrow(
            "SELECT id, name, created_at FROM tenants WHERE id = $1", uuid.UUID(tenant_id)
        )
        return _tenant(r) if r else None

    async def get_tenant_by_name(self, conn: asyncpg.Connection, name: str) -> TenantRow | None:
        r = await conn.fetchrow("SELECT id, name, created_at FROM tenants WHERE name = $1", name)
        return _tenant(r) if r else None

    async def insert_tenant(self, conn: asyncpg.Connection, name: str) -> TenantRow:
        r = await conn.fetchrow(
            "INSERT INTO tenants (name) VALUES ($1) RETURNING id, name, created_at", name
        )
        assert r is not None
        return _tenant(r)

    async def insert_api_key(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        key_id: str,
        secret: str,
        role: str,
        description: str,
    ) -> ApiKeyRow:
        r = await conn.fetchrow(
            "INSERT INTO api_keys (id, tenant_id, secret, role, description) "
            f"VALUES ($1, $2, $3, $4, $5) RETURNING {_KEY_COLS}",
            key_id,
            uuid.UUID(tenant_id),
            secret,
            role,
            description,
        )
        assert r is not None
        return _key(r)

    async def find_active_key(
        self, conn: asyncpg.Connection, *, tenant_id: str, description: str
    ) -> tuple[ApiKeyRow, str] | None:
        r = await conn.fetchrow(
            f"SELECT {_KEY_COLS}, secret FROM api_keys "
            "WHERE tenant_id = $1 AND description = $2 AND revoked_at IS NULL "
            "ORDER BY created_at LIMIT 1",
            uuid.UUID(tenant_id),
            description,
        )
        return (_key(r), r["secret"]) if r else None

    async def list_api_keys(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        include_revoked: bool,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[ApiKeyRow]:
        rows = await conn.fetch(
            f"SELECT {_KEY_COLS} FROM api_keys WHERE tenant_id = $1 "
            "AND ($2 OR revoked_at IS NULL) "
            "AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4)) "
            "ORDER BY created_at, id LIMIT $5",
            uuid.UUID(tenant_id),
            include_revoked,
            after[0] if after else None,
            after[1] if after else "",
            limit,
        )
        return [_key(r) for r in rows]

    async def revoke_api_key(
        self, conn: asyncpg.Connection, *, tenant_id: str, key_id: str
    ) -> ApiKeyRow | None:
        r = await conn.fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) "
            f"WHERE tenant_id = $1 AND id = $2 RETURNING {_KEY_COLS}",
            uuid.UUID(tenant_id),
            key_id,
        )
        return _key(r) if r else None
