"""Rules of tenant administration: API keys (the secrets that sign access tokens)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from classmesh.admin.store import AdminStore, ApiKeyRow, TenantRow
from classmesh.core.auth import AccessToken, Principal, require
from classmesh.core.db import transaction
from classmesh.core.errors import AlreadyExists, InvalidArgument, NotFound, Validator
from classmesh.core.paging import decode_page_token

__all__ = [
    "AdminService",
    "CreatedKey",
    "api_key_cursor",
    "DevBootstrap",
    "create_tenant_with_key",
    "dev_bootstrap",
    "new_key_id",
    "new_secret",
]

KEY_ROLES = ("admin",)
DEV_KEY_DESCRIPTION = "classmesh up development key"
MAX_PAGE = 100


#: The ErrorInfo reason of a page token this API did not hand out (as every other service).
PAGE_TOKEN_INVALID = "PAGE_TOKEN_INVALID"


def api_key_cursor(token: str) -> tuple[datetime, str] | None:
    """The (created_at, key id) keyset cursor of a ListApiKeys page token; None for none."""
    values = decode_page_token(token, 2, reason=PAGE_TOKEN_INVALID)
    if values is None:
        return None
    try:
        if not isinstance(values[1], str) or not values[1]:
            raise ValueError("key id")
        return datetime.fromisoformat(str(values[0])), values[1]
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(
            [("page_token", "not a page token of this list")], reason=PAGE_TOKEN_INVALID
        ) from exc


def new_key_id() -> str:
    return "ck_" + secrets.token_hex(10)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class CreatedKey:
    """A new key: the secret is shown once, here, and never returned again."""

    tenant_id: str
    key_id: str
    secret: str
    row: ApiKeyRow | None = None


@dataclass(frozen=True)
class DevBootstrap:
    tenant_id: str
    key_id: str
    token: str


class AdminService:
    """Tenant-scoped administration; every call requires the `admin` role."""

    def __init__(self, store: AdminStore | None = None) -> None:
        self.store = store or AdminStore()

    async def get_tenant(self, conn: asyncpg.Connection, principal: Principal) -> TenantRow:
        require(principal, roles=("admin",))
        tenant = await self.store.get_tenant(conn, principal.tenant_id)
        if tenant is None:
            raise NotFound("tenant", principal.tenant_id)
        return tenant

    async def create_api_key(
        self, conn: asyncpg.Connection, principal: Principal, *, description: str
    ) -> CreatedKey:
        require(principal, roles=("admin",))
        v = Validator()
        v.require_len("description", description, 0, 200)
        v.raise_if_any()
        key_id, secret = new_key_id(), new_secret()
        row = await self.store.insert_api_key(
            conn,
            tenant_id=principal.tenant_id,
            key_id=key_id,
            secret=secret,
            role="admin",
            description=description,
        )
        return CreatedKey(tenant_id=principal.tenant_id, key_id=key_id, secret=secret, row=row)

    async def list_api_keys(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        *,
        include_revoked: bool,
        page_size: int,
        after: tuple[datetime, str] | None,
    ) -> list[ApiKeyRow]:
        require(principal, roles=("admin",))
        limit = MAX_PAGE if page_size <= 0 else min(page_size, MAX_PAGE)
        return await self.store.list_api_keys(
            conn,
            tenant_id=principal.tenant_id,
            include_revoked=include_revoked,
            after=after,
            limit=limit,
        )

    async def revoke_api_key(
        self, conn: asyncpg.Connection, principal: Principal, *, key_id: str
    ) -> ApiKeyRow:
        require(principal, roles=("admin",))
        v = Validator()
        v.require_len("key_id", key_id, 4, 128)
        v.raise_if_any()
        row = await self.store.revoke_api_key(conn, tenant_id=principal.tenant_id, key_id=key_id)
        if row is None:
            raise NotFound("api_key", key_id)
        return row


async def create_tenant_with_key(conn: asyncpg.Connection, name: str) -> CreatedKey:
    """Create a tenant and its first admin key (the `classmesh tenant create` command)."""
    v = Validator()
    v.require_len("name", name.strip(), 1, 100)
    v.raise_if_any()
    store = AdminStore()
    async with conn.transaction():
        if await store.get_tenant_by_name(conn, name.strip()) is not None:
            raise AlreadyExists("ALREADY_EXISTS", f"tenant {name.strip()!r} already exists")
        tenant = await store.insert_tenant(conn, name.strip())
        key_id, secret = new_key_id(), new_secret()
        row = await store.insert_api_key(
            conn,
            tenant_id=tenant.id,
            key_id=key_id,
            secret=secret,
            role="admin",
            description="created by classmesh tenant create",
        )
    return CreatedKey(tenant_id=tenant.id, key_id=key_id, secret=secret, row=row)


async def dev_bootstrap(pool: asyncpg.Pool, tenant_name: str) -> DevBootstrap:
    """Ensure the development tenant and key exist; mint a 24 h admin token for them."""
    store = AdminStore()
    async with transaction(pool) as conn:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('classmesh.dev_bootstrap'))")
        tenant = await store.get_tenant_by_name(conn, tenant_name)
        if tenant is None:
            tenant = await store.insert_tenant(conn, tenant_name)
        found = await store.find_active_key(
            conn, tenant_id=tenant.id, description=DEV_KEY_DESCRIPTION
        )
        if found is None:
            key_id, secret = new_key_id(), new_secret()
            await store.insert_api_key(
                conn,
                tenant_id=tenant.id,
                key_id=key_id,
                secret=secret,
                role="admin",
                description=DEV_KEY_DESCRIPTION,
            )
        else:
            key_id, secret = found[0].id, found[1]
    token = (
        AccessToken(key_id, secret)
        .with_tenant(tenant.id)
        .with_identity("dev-admin", "Development Admin")
        .with_grants(
            session="*",
            role="admin",
            caps=["publish", "subscribe", "chat", "moderate", "record", "admin"],
        )
        .with_ttl(timedelta(hours=24))
        .to_jwt()
    )
    return DevBootstrap(tenant_id=tenant.id, key_id=key_id, token=token)
