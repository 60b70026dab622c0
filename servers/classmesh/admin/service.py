"""Rules of tenant administration: the tenant, API keys (the secrets that sign access
tokens), webhooks and the tenant-wide audit log.

Every change is audited (core/audit.py) in the transaction of the change; tenant-level
entries have no session.
"""

from __future__ import annotations

import ipaddress
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from classmesh.admin.netguard import literal_host_reason
from classmesh.admin.store import AdminStore, ApiKeyRow, DeliveryRow, TenantRow, WebhookRow
from classmesh.core.audit import insert_audit
from classmesh.core.auth import AccessToken, Principal, require
from classmesh.core.db import transaction
from classmesh.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Validator,
)
from classmesh.core.eventproto import EVENT_TYPES
from classmesh.core.paging import decode_page_token
from classmesh.session.store import AuditRow, SessionStore

__all__ = [
    "AdminService",
    "AuditFilter",
    "CreatedKey",
    "CreatedWebhook",
    "api_key_cursor",
    "time_cursor",
    "check_webhook_url",
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


def time_cursor(token: str) -> tuple[datetime, str] | None:
    """The (created_at, UUID) keyset cursor of a webhook or audit page token."""
    values = decode_page_token(token, 2, reason=PAGE_TOKEN_INVALID)
    if values is None:
        return None
    try:
        return datetime.fromisoformat(str(values[0])), str(uuid.UUID(str(values[1])))
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(
            [("page_token", "not a page token of this list")], reason=PAGE_TOKEN_INVALID
        ) from exc


#: Hosts a webhook may reach over plain http (development and tests on one machine).
_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})
MAX_URL = 2048
MAX_EVENT_TYPES = 100
MAX_WEBHOOK_DESCRIPTION = 500
MAX_TENANT_NAME = 100
MAX_ACTOR_ID = 255


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_webhook_url(v: Validator, url: str, *, allow_private: bool = False) -> None:
    """https with a host; http only to a loopback host (localhost, 127.0.0.0/8, ::1).
    Unless `allow_private`, a host that is a non-public IP literal (loopback, private,
    link-local, ...; netguard.py) is refused; host names are checked at delivery."""
    if not url:
        v.add("url", "is required")
        return
    if len(url) > MAX_URL:
        v.add("url", f"length must be between 1 and {MAX_URL} characters")
        return
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        v.add("url", "must not contain whitespace or control characters")
        return
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port  # a bad port raises ValueError
    except ValueError:
        v.add("url", "is not a valid URL")
        return
    if parts.scheme not in ("https", "http") or not host:
        v.add("url", "must be an https:// URL with a host")
    elif parts.username is not None or parts.password is not None:
        v.add("url", "must not carry credentials (the signature authenticates deliveries)")
    elif parts.fragment:
        v.add("url", "must not have a fragment")
    elif not allow_private and (reason := literal_host_reason(host)) is not None:
        v.add("url", f"must reach a public address: {reason}")
    elif parts.scheme == "http" and not _is_loopback(host):
        v.add("url", "must use https (http is accepted only for localhost)")


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
class CreatedWebhook:
    """A new webhook: the signing secret is shown once, here, and never returned again."""

    row: WebhookRow
    secret: str


@dataclass(frozen=True)
class AuditFilter:
    """What ListAuditLogs selects (validated by the servicer's request conversion)."""

    session_id: str
    actor_id: str
    target_user_id: str
    actions: Sequence[str]
    created_from: datetime | None
    created_until: datetime | None


def _actor(principal: Principal) -> str:
    """Audit actor: the token's user, or the API key when the token has no user."""
    return principal.subject or f"api_key:{principal.key_id}"


@dataclass(frozen=True)
class DevBootstrap:
    tenant_id: str
    key_id: str
    token: str


class AdminService:
    """Tenant-scoped administration; every call requires the `admin` role."""

    def __init__(
        self,
        store: AdminStore | None = None,
        *,
        max_webhooks: int = 20,
        allow_private_webhooks: bool = False,
        webhook_max_attempts: int = 8,
        audit_store: SessionStore | None = None,
    ) -> None:
        self.store = store or AdminStore()
        self.max_webhooks = max_webhooks
        self.allow_private_webhooks = allow_private_webhooks
        #: Attempts a retried dead delivery gets (as many as a new one).
        self.webhook_max_attempts = webhook_max_attempts
        #: The audit log is read with the one query SessionService.ListAuditLogs uses.
        self.audit_store = audit_store or SessionStore()

    async def _audit(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        action: str,
        *,
        target_type: str,
        target_id: str,
        request_id: str,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        md: dict[str, Any] = {"actorName": principal.name} if principal.name else {}
        md.update(metadata or {})
        await insert_audit(
            conn,
            tenant_id=principal.tenant_id,
            session_id=None,
            actor_id=_actor(principal),
            actor_role=principal.role,
            action=action,
            target_type=target_type,
            target_id=target_id,
            metadata=md,
            request_id=request_id,
        )

    async def get_tenant(self, conn: asyncpg.Connection, principal: Principal) -> TenantRow:
        require(principal, roles=("admin",))
        tenant = await self.store.get_tenant(conn, principal.tenant_id)
        if tenant is None:
            raise NotFound("tenant", principal.tenant_id)
        return tenant

    async def create_api_key(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        *,
        description: str,
        request_id: str = "",
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
        await self._audit(
            conn,
            principal,
            "api_key_created",
            target_type="api_key",
            target_id=key_id,
            request_id=request_id,
            metadata={"name": description},
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
        self, conn: asyncpg.Connection, principal: Principal, *, key_id: str, request_id: str = ""
    ) -> ApiKeyRow:
        require(principal, roles=("admin",))
        v = Validator()
        v.require_len("key_id", key_id, 4, 128)
        v.raise_if_any()
        row = await self.store.revoke_api_key(conn, tenant_id=principal.tenant_id, key_id=key_id)
        if row is None:
            raise NotFound("api_key", key_id)
        await self._audit(
            conn,
            principal,
            "api_key_revoked",
            target_type="api_key",
            target_id=key_id,
            request_id=request_id,
        )
        return row

    # ------------------------------------------------------------------ tenant

    async def update_tenant(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        *,
        paths: Sequence[str],
        name: str,
        request_id: str,
    ) -> TenantRow:
        """Apply the masked fields ("name"); audited with the previous values."""
        require(principal, roles=("admin",))
        v = Validator()
        if not paths:
            v.add("update_mask", "is required (updatable fields: name)")
        for path in paths:
            if path != "name":
                v.add("update_mask", f"unknown or read-only field {path!r} (updatable: name)")
        new_name = name.strip()
        if "name" in paths:
            if not new_name:
                v.add("tenant.name", "is required" if not name else "must not be blank")
            elif len(new_name) > MAX_TENANT_NAME:
                v.add("tenant.name", f"length must be between 1 and {MAX_TENANT_NAME} characters")
        v.raise_if_any()
        old = await self.store.lock_tenant(conn, principal.tenant_id)
        if old is None:
            raise NotFound("tenant", principal.tenant_id)
        if old.name != new_name:
            if not await self.store.rename_tenant(conn, principal.tenant_id, new_name):
                raise AlreadyExists("ALREADY_EXISTS", f"a tenant named {new_name!r} exists")
            await self._audit(
                conn,
                principal,
                "tenant_updated",
                target_type="tenant",
                target_id=principal.tenant_id,
                request_id=request_id,
                metadata={"previous": {"name": old.name}, "fields": ["name"]},
            )
        tenant = await self.store.get_tenant(conn, principal.tenant_id)
        assert tenant is not None
        return tenant

    # ------------------------------------------------------------------ webhooks

    async def create_webhook(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        *,
        url: str,
        event_types: Sequence[str],
        description: str,
        request_id: str,
    ) -> CreatedWebhook:
        require(principal, roles=("admin",))
        v = Validator()
        check_webhook_url(v, url, allow_private=self.allow_private_webhooks)
        if len(event_types) > MAX_EVENT_TYPES:
            v.add("event_types", f"at most {MAX_EVENT_TYPES} event types")
        unknown = sorted({t for t in event_types if t not in EVENT_TYPES})
        if unknown:
            v.add(
                "event_types",
                "unknown event types (use payload field names of classmesh.events.v1.Event, "
                f"e.g. session_started): {', '.join(unknown[:5])[:200]}",
            )
        if len(description) > MAX_WEBHOOK_DESCRIPTION:
            v.add(
                "description", f"length must be between 0 and {MAX_WEBHOOK_DESCRIPTION} characters"
            )
        v.raise_if_any()
        # The tenant row lock serialises creations, so the limit holds under concurrency.
        if await self.store.lock_tenant(conn, principal.tenant_id) is None:
            raise NotFound("tenant", principal.tenant_id)
        if await self.store.count_webhooks(conn, principal.tenant_id) >= self.max_webhooks:
            raise FailedPrecondition(
                "WEBHOOK_LIMIT_REACHED",
                f"the tenant already has {self.max_webhooks} webhooks; delete one first",
                metadata={"limit": str(self.max_webhooks)},
            )
        secret = new_secret()
        types = list(dict.fromkeys(event_types))
        row = await self.store.insert_webhook(
            conn,
            tenant_id=principal.tenant_id,
            url=url,
            secret=secret,
            event_types=types,
            description=description,
        )
        await self._audit(
            conn,
            principal,
            "webhook_created",
            target_type="webhook",
            target_id=row.id,
            request_id=request_id,
            metadata={"url": url, "eventTypes": types},
        )
        return CreatedWebhook(row=row, secret=secret)

    async def list_webhooks(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        *,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> list[WebhookRow]:
        require(principal, roles=("admin",))
        return await self.store.list_webhooks(
            conn, tenant_id=principal.tenant_id, after=after, limit=limit
        )

    async def delete_webhook(
        self, conn: asyncpg.Connection, principal: Principal, *, webhook_id: str, request_id: str
    ) -> WebhookRow:
        require(principal, roles=("admin",))
        v = Validator()
        wid = v.require_uuid("webhook_id", webhook_id)
        v.raise_if_any()
        row = await self.store.delete_webhook(conn, tenant_id=principal.tenant_id, webhook_id=wid)
        if row is None:
            raise NotFound("webhook", webhook_id)
        await self._audit(
            conn,
            principal,
            "webhook_deleted",
            target_type="webhook",
            target_id=row.id,
            request_id=request_id,
            metadata={"url": row.url},
        )
        return row

    async def list_webhook_deliveries(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        *,
        webhook_id: str,
        states: Sequence[str],
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> list[DeliveryRow]:
        require(principal, roles=("admin",))
        v = Validator()
        wid = v.require_uuid("webhook_id", webhook_id)
        v.raise_if_any()
        if not await self.store.webhook_exists(conn, tenant_id=principal.tenant_id, webhook_id=wid):
            raise NotFound("webhook", webhook_id)
        return await self.store.list_deliveries(
            conn,
            tenant_id=principal.tenant_id,
            webhook_id=wid,
            states=list(states),
            after=after,
            limit=limit,
        )

    async def retry_webhook_delivery(
        self, conn: asyncpg.Connection, principal: Principal, *, delivery_id: str, request_id: str
    ) -> DeliveryRow:
        """Queue a dead delivery for now with a fresh budget of attempts (audited)."""
        require(principal, roles=("admin",))
        v = Validator()
        did = v.require_uuid("delivery_id", delivery_id)
        v.raise_if_any()
        row = await self.store.lock_delivery(conn, tenant_id=principal.tenant_id, delivery_id=did)
        if row is None:
            raise NotFound("webhook delivery", delivery_id)
        if row.state != "dead":
            raise FailedPrecondition(
                "JOB_NOT_RETRYABLE",
                f"only a dead delivery can be retried; this one is {row.state}",
                metadata={"state": row.state},
            )
        retried = await self.store.requeue_delivery(
            conn, delivery_id=did, more_attempts=self.webhook_max_attempts
        )
        await self._audit(
            conn,
            principal,
            "job_retried",
            target_type="webhook_delivery",
            target_id=did,
            request_id=request_id,
            metadata={
                "webhookId": row.webhook_id,
                "eventId": row.event_key,
                "attempts": row.attempts,
                "lastError": row.last_error or "",
            },
        )
        return retried

    # ------------------------------------------------------------------ audit log

    async def list_audit_logs(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        *,
        where: AuditFilter,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> list[AuditRow]:
        """The tenant's audit log, newest first (session entries and tenant-level ones)."""
        require(principal, roles=("admin",))
        return await self.audit_store.list_audit(
            conn,
            tenant_id=principal.tenant_id,
            session_id=where.session_id or None,
            actions=where.actions,
            actor_id=where.actor_id,
            target_user_id=where.target_user_id,
            created_from=where.created_from,
            created_until=where.created_until,
            after=after,
            limit=limit,
        )


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
