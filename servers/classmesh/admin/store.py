"""SQL for tenants, API keys and webhooks. Takes a Connection; the service owns the transaction.

The webhook delivery queue (fan-out of session_events, claims, outcomes) is in
`classmesh.admin.webhooks`, which owns that background work.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

__all__ = ["ApiKeyRow", "TenantRow", "WebhookRow", "DeliveryRow", "AdminStore"]


@dataclass(frozen=True, slots=True)
class TenantRow:
    id: str
    name: str
    created_at: datetime
    updated_at: datetime | None = None
    api_key_count: int = 0
    webhook_count: int = 0


@dataclass(frozen=True, slots=True)
class WebhookRow:
    id: str
    tenant_id: str
    url: str
    event_types: list[str]
    description: str
    active: bool
    secret_hint: str
    created_at: datetime
    updated_at: datetime
    last_success_at: datetime | None
    consecutive_failures: int


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: str
    webhook_id: str
    event_key: str
    event_type: str
    state: str
    attempts: int
    max_attempts: int
    last_error: str | None
    response_status: int | None
    created_at: datetime
    updated_at: datetime
    run_after: datetime
    delivered_at: datetime | None


_DELIVERY_COLS = (
    "id, webhook_id, event_key, event_type, state::text AS state, attempts, max_attempts, "
    "last_error, response_status, created_at, updated_at, run_after, delivered_at"
)


def _delivery(r: asyncpg.Record) -> DeliveryRow:
    return DeliveryRow(
        id=str(r["id"]),
        webhook_id=str(r["webhook_id"]),
        event_key=r["event_key"],
        event_type=r["event_type"],
        state=r["state"],
        attempts=r["attempts"],
        max_attempts=r["max_attempts"],
        last_error=r["last_error"],
        response_status=r["response_status"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        run_after=r["run_after"],
        delivered_at=r["delivered_at"],
    )


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
    keys = r.get("api_key_count")
    hooks = r.get("webhook_count")
    return TenantRow(
        id=str(r["id"]),
        name=r["name"],
        created_at=r["created_at"],
        updated_at=r.get("updated_at"),
        api_key_count=int(keys or 0),
        webhook_count=int(hooks or 0),
    )


def _webhook(r: asyncpg.Record) -> WebhookRow:
    return WebhookRow(
        id=str(r["id"]),
        tenant_id=str(r["tenant_id"]),
        url=r["url"],
        event_types=list(r["event_types"]),
        description=r["description"],
        active=r["active"],
        secret_hint=r["secret_hint"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        last_success_at=r["last_success_at"],
        consecutive_failures=r["consecutive_failures"],
    )


_WEBHOOK_COLS = (
    "id, tenant_id, url, event_types, description, active, right(secret, 4) AS secret_hint, "
    "created_at, updated_at, last_success_at, consecutive_failures"
)
#: A tenant with its counts (GetTenant, UpdateTenant).
_TENANT_FULL = (
    "SELECT t.id, t.name, t.created_at, t.updated_at, "
    "(SELECT count(*) FROM api_keys k WHERE k.tenant_id = t.id AND k.revoked_at IS NULL) "
    "AS api_key_count, "
    "(SELECT count(*) FROM webhooks w WHERE w.tenant_id = t.id) AS webhook_count "
    "FROM tenants t WHERE t.id = $1"
)


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
        r = await conn.fetchrow(_TENANT_FULL, uuid.UUID(tenant_id))
        return _tenant(r) if r else None

    async def lock_tenant(self, conn: asyncpg.Connection, tenant_id: str) -> TenantRow | None:
        """The tenant row, locked for the rest of the transaction (updates, webhook limit)."""
        r = await conn.fetchrow(
            "SELECT id, name, created_at FROM tenants WHERE id = $1 FOR UPDATE",
            uuid.UUID(tenant_id),
        )
        return _tenant(r) if r else None

    async def rename_tenant(self, conn: asyncpg.Connection, tenant_id: str, name: str) -> bool:
        """Set the name; False if another tenant has it (names are unique)."""
        try:
            async with conn.transaction():
                await conn.execute(
                    "UPDATE tenants SET name = $2, updated_at = now() WHERE id = $1",
                    uuid.UUID(tenant_id),
                    name,
                )
        except asyncpg.UniqueViolationError:
            return False
        return True

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

    # ------------------------------------------------------------------ webhooks

    async def count_webhooks(self, conn: asyncpg.Connection, tenant_id: str) -> int:
        n = await conn.fetchval(
            "SELECT count(*) FROM webhooks WHERE tenant_id = $1", uuid.UUID(tenant_id)
        )
        return int(n or 0)

    async def insert_webhook(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        url: str,
        secret: str,
        event_types: list[str],
        description: str,
    ) -> WebhookRow:
        r = await conn.fetchrow(
            "INSERT INTO webhooks (tenant_id, url, secret, event_types, description) "
            f"VALUES ($1, $2, $3, $4, $5) RETURNING {_WEBHOOK_COLS}",
            uuid.UUID(tenant_id),
            url,
            secret,
            event_types,
            description,
        )
        assert r is not None
        return _webhook(r)

    async def list_webhooks(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[WebhookRow]:
        """Newest first, keyset-paged by (created_at, id)."""
        rows = await conn.fetch(
            f"SELECT {_WEBHOOK_COLS} FROM webhooks WHERE tenant_id = $1 "
            "AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3::uuid)) "
            "ORDER BY created_at DESC, id DESC LIMIT $4",
            uuid.UUID(tenant_id),
            after[0] if after else None,
            uuid.UUID(after[1]) if after else None,
            limit,
        )
        return [_webhook(r) for r in rows]

    async def delete_webhook(
        self, conn: asyncpg.Connection, *, tenant_id: str, webhook_id: str
    ) -> WebhookRow | None:
        """Delete the webhook; its queued deliveries go with it (foreign key cascade)."""
        r = await conn.fetchrow(
            f"DELETE FROM webhooks WHERE tenant_id = $1 AND id = $2 RETURNING {_WEBHOOK_COLS}",
            uuid.UUID(tenant_id),
            uuid.UUID(webhook_id),
        )
        return _webhook(r) if r else None

    async def webhook_exists(
        self, conn: asyncpg.Connection, *, tenant_id: str, webhook_id: str
    ) -> bool:
        found = await conn.fetchval(
            "SELECT 1 FROM webhooks WHERE tenant_id = $1 AND id = $2",
            uuid.UUID(tenant_id),
            uuid.UUID(webhook_id),
        )
        return found is not None

    async def list_deliveries(
        self,
        conn: asyncpg.Connection,
        *,
        tenant_id: str,
        webhook_id: str,
        states: list[str],
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[DeliveryRow]:
        """A webhook's deliveries, newest first, keyset-paged by (created_at, id); `states`
        empty = all (served by webhook_deliveries_tenant_webhook_idx)."""
        rows = await conn.fetch(
            f"SELECT {_DELIVERY_COLS} FROM webhook_deliveries "
            "WHERE tenant_id = $1 AND webhook_id = $2 "
            "AND (cardinality($3::text[]) = 0 OR state::text = ANY($3::text[])) "
            "AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5::uuid)) "
            "ORDER BY created_at DESC, id DESC LIMIT $6",
            uuid.UUID(tenant_id),
            uuid.UUID(webhook_id),
            states,
            after[0] if after else None,
            uuid.UUID(after[1]) if after else None,
            limit,
        )
        return [_delivery(r) for r in rows]

    async def lock_delivery(
        self, conn: asyncpg.Connection, *, tenant_id: str, delivery_id: str
    ) -> DeliveryRow | None:
        r = await conn.fetchrow(
            f"SELECT {_DELIVERY_COLS} FROM webhook_deliveries "
            "WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
            uuid.UUID(tenant_id),
            uuid.UUID(delivery_id),
        )
        return _delivery(r) if r else None

    async def requeue_delivery(
        self, conn: asyncpg.Connection, *, delivery_id: str, more_attempts: int
    ) -> DeliveryRow:
        """Queue a dead delivery for now with `more_attempts` further attempts (the count of
        attempts made is kept: the classmesh-attempt header keeps rising)."""
        r = await conn.fetchrow(
            "UPDATE webhook_deliveries SET state = 'queued', run_after = now(), "
            "max_attempts = attempts + $2, locked_at = NULL, updated_at = now() "
            f"WHERE id = $1 RETURNING {_DELIVERY_COLS}",
            uuid.UUID(delivery_id),
            more_attempts,
        )
        assert r is not None
        return _delivery(r)
