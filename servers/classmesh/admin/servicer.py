"""gRPC edge of AdminService: protobuf <-> domain, nothing else.

Every RPC is implemented. `create_servicer` also starts this process's webhook dispatcher
(`classmesh.admin.webhooks`), stopped when the runtime closes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import grpc

from classmesh.admin.service import AdminService, AuditFilter, api_key_cursor, time_cursor
from classmesh.admin.store import ApiKeyRow, DeliveryRow, TenantRow, WebhookRow
from classmesh.admin.v1 import admin_pb2, admin_service_pb2, admin_service_pb2_grpc
from classmesh.admin.webhooks import WebhookDispatcher
from classmesh.core.auth import current_principal
from classmesh.core.db import connection
from classmesh.core.errors import InvalidArgument, Validator
from classmesh.core.mutations import Outcome, run_mutation
from classmesh.core.paging import encode_page_token, page_size
from classmesh.core.runtime import Runtime
from classmesh.core.timeutil import to_timestamp
from classmesh.session.convert import AUDIT_ACTIONS, audit_proto
from classmesh.session.service import _time_range

__all__ = ["AdminServicer", "SERVICER_CLASS", "create_servicer"]

_Ctx = grpc.aio.ServicerContext[Any, Any]
_SERVICE = "/classmesh.admin.v1.AdminService/"


def _api_key(row: ApiKeyRow) -> admin_pb2.ApiKey:
    key = admin_pb2.ApiKey(
        id=row.id,
        tenant_id=row.tenant_id,
        name=row.description,
        status=(
            admin_pb2.API_KEY_STATUS_REVOKED
            if row.revoked_at is not None
            else admin_pb2.API_KEY_STATUS_ACTIVE
        ),
        secret_hint=row.secret_hint,
    )
    key.create_time.CopyFrom(to_timestamp(row.created_at))
    if row.revoked_at is not None:
        key.revoke_time.CopyFrom(to_timestamp(row.revoked_at))
    if row.last_used_at is not None:
        key.last_used_time.CopyFrom(to_timestamp(row.last_used_at))
    return key


_AUDIT_BY_ENUM = {number: name for name, number in AUDIT_ACTIONS.items()}
MAX_ID = 255


def _tenant(row: TenantRow) -> admin_pb2.Tenant:
    out = admin_pb2.Tenant(
        id=row.id,
        name=row.name,
        status=admin_pb2.TENANT_STATUS_ACTIVE,
        api_key_count=row.api_key_count,
        webhook_count=row.webhook_count,
    )
    out.create_time.CopyFrom(to_timestamp(row.created_at))
    if row.updated_at is not None:
        out.update_time.CopyFrom(to_timestamp(row.updated_at))
    return out


def _webhook(row: WebhookRow) -> admin_pb2.Webhook:
    out = admin_pb2.Webhook(
        id=row.id,
        tenant_id=row.tenant_id,
        url=row.url,
        event_types=row.event_types,
        description=row.description,
        enabled=row.active,
        secret_hint=row.secret_hint,
        consecutive_failures=row.consecutive_failures,
    )
    out.create_time.CopyFrom(to_timestamp(row.created_at))
    out.update_time.CopyFrom(to_timestamp(row.updated_at))
    if row.last_success_at is not None:
        out.last_success_time.CopyFrom(to_timestamp(row.last_success_at))
    return out


_DELIVERY_STATES: dict[str, admin_pb2.WebhookDeliveryState.ValueType] = {
    "queued": admin_pb2.WEBHOOK_DELIVERY_STATE_QUEUED,
    "running": admin_pb2.WEBHOOK_DELIVERY_STATE_RUNNING,
    "succeeded": admin_pb2.WEBHOOK_DELIVERY_STATE_SUCCEEDED,
    "dead": admin_pb2.WEBHOOK_DELIVERY_STATE_DEAD,
}
_DELIVERY_STATE_NAMES = {number: name for name, number in _DELIVERY_STATES.items()}


def _delivery(row: DeliveryRow) -> admin_pb2.WebhookDelivery:
    out = admin_pb2.WebhookDelivery(
        id=row.id,
        webhook_id=row.webhook_id,
        event_id=row.event_key,
        event_type=row.event_type,
        state=_DELIVERY_STATES.get(row.state, admin_pb2.WEBHOOK_DELIVERY_STATE_UNSPECIFIED),
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        last_error=row.last_error or "",
        response_status=row.response_status or 0,
    )
    out.create_time.CopyFrom(to_timestamp(row.created_at))
    out.update_time.CopyFrom(to_timestamp(row.updated_at))
    if row.state == "queued":
        out.next_attempt_time.CopyFrom(to_timestamp(row.run_after))
    if row.delivered_at is not None:
        out.delivered_time.CopyFrom(to_timestamp(row.delivered_at))
    return out


def _delivery_states(request: admin_service_pb2.ListWebhookDeliveriesRequest) -> list[str]:
    names: list[str] = []
    for number in request.states:
        if number not in _DELIVERY_STATE_NAMES:
            raise InvalidArgument([("states", "unknown webhook delivery state")])
        names.append(_DELIVERY_STATE_NAMES[number])
    return sorted(set(names))


def _audit_filter(request: admin_service_pb2.ListAuditLogsRequest) -> AuditFilter:
    v = Validator()
    session_id = v.require_uuid("session_id", request.session_id) if request.session_id else ""
    actions: list[str] = []
    for number in request.actions:
        if number not in _AUDIT_BY_ENUM:
            v.add("actions", "unknown audit action")
            break
        actions.append(_AUDIT_BY_ENUM[number])
    for name in ("actor_user_id", "target_user_id"):
        if len(getattr(request, name)) > MAX_ID:
            v.add(name, f"length must be between 0 and {MAX_ID} characters")
    start, end = _time_range(v, "time_range", request.time_range)
    v.raise_if_any()
    return AuditFilter(
        session_id=session_id,
        actor_id=request.actor_user_id,
        target_user_id=request.target_user_id,
        actions=actions,
        created_from=start,
        created_until=end,
    )


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, runtime: Runtime, service: AdminService | None = None) -> None:
        self.runtime = runtime
        self.service = service or AdminService(
            max_webhooks=runtime.config.webhook_max_per_tenant,
            allow_private_webhooks=runtime.config.webhook_allow_private,
            webhook_max_attempts=runtime.config.webhook_max_attempts,
        )
        self.dispatcher = WebhookDispatcher(runtime)

    def start_background(self) -> None:
        self.dispatcher.start()
        self.runtime.on_close(self.dispatcher.stop)

    async def GetTenant(
        self, request: admin_service_pb2.GetTenantRequest, context: _Ctx
    ) -> admin_service_pb2.GetTenantResponse:
        principal = current_principal()
        async with connection(self.runtime.pool) as conn:
            tenant = await self.service.get_tenant(conn, principal)
        return admin_service_pb2.GetTenantResponse(tenant=_tenant(tenant))

    async def UpdateTenant(
        self, request: admin_service_pb2.UpdateTenantRequest, context: _Ctx
    ) -> admin_service_pb2.UpdateTenantResponse:
        principal = current_principal()

        async def work(conn: asyncpg.Connection) -> Outcome[admin_service_pb2.UpdateTenantResponse]:
            row = await self.service.update_tenant(
                conn,
                principal,
                paths=list(request.update_mask.paths),
                name=request.tenant.name,
                request_id=request.request_id,
            )
            return Outcome(admin_service_pb2.UpdateTenantResponse(tenant=_tenant(row)))

        return await run_mutation(
            self.runtime,
            principal,
            _SERVICE + "UpdateTenant",
            request,
            admin_service_pb2.UpdateTenantResponse,
            work,
        )

    async def CreateApiKey(
        self, request: admin_service_pb2.CreateApiKeyRequest, context: _Ctx
    ) -> admin_service_pb2.CreateApiKeyResponse:
        principal = current_principal()
        if request.HasField("expire_time"):
            raise InvalidArgument(
                [("expire_time", "key expiry is not supported; revoke keys with RevokeApiKey")]
            )

        async def work(conn: asyncpg.Connection) -> Outcome[admin_service_pb2.CreateApiKeyResponse]:
            created = await self.service.create_api_key(
                conn,
                principal,
                description=request.name,
                request_id=request.request_id,
            )
            assert created.row is not None
            return Outcome(
                admin_service_pb2.CreateApiKeyResponse(
                    api_key=_api_key(created.row), secret=created.secret
                )
            )

        return await run_mutation(
            self.runtime,
            principal,
            _SERVICE + "CreateApiKey",
            request,
            admin_service_pb2.CreateApiKeyResponse,
            work,
        )

    async def ListApiKeys(
        self, request: admin_service_pb2.ListApiKeysRequest, context: _Ctx
    ) -> admin_service_pb2.ListApiKeysResponse:
        principal = current_principal()
        size = page_size(request.page_size, default=50, cap=100)
        after = api_key_cursor(request.page_token)
        async with connection(self.runtime.pool) as conn:
            rows = await self.service.list_api_keys(
                conn,
                principal,
                include_revoked=request.include_inactive,
                page_size=size + 1,
                after=after,
            )
        page, token = _keyset_page(rows, size)
        return admin_service_pb2.ListApiKeysResponse(
            api_keys=[_api_key(r) for r in page], next_page_token=token
        )

    async def RevokeApiKey(
        self, request: admin_service_pb2.RevokeApiKeyRequest, context: _Ctx
    ) -> admin_service_pb2.RevokeApiKeyResponse:
        principal = current_principal()

        async def work(conn: asyncpg.Connection) -> Outcome[admin_service_pb2.RevokeApiKeyResponse]:
            row = await self.service.revoke_api_key(
                conn,
                principal,
                key_id=request.api_key_id,
                request_id=request.request_id,
            )
            return Outcome(admin_service_pb2.RevokeApiKeyResponse(api_key=_api_key(row)))

        response = await run_mutation(
            self.runtime,
            principal,
            _SERVICE + "RevokeApiKey",
            request,
            admin_service_pb2.RevokeApiKeyResponse,
            work,
        )
        self.runtime.keys.invalidate(request.api_key_id)
        return response

    async def CreateWebhook(
        self, request: admin_service_pb2.CreateWebhookRequest, context: _Ctx
    ) -> admin_service_pb2.CreateWebhookResponse:
        principal = current_principal()

        async def work(
            conn: asyncpg.Connection,
        ) -> Outcome[admin_service_pb2.CreateWebhookResponse]:
            created = await self.service.create_webhook(
                conn,
                principal,
                url=request.url,
                event_types=list(request.event_types),
                description=request.description,
                request_id=request.request_id,
            )
            return Outcome(
                admin_service_pb2.CreateWebhookResponse(
                    webhook=_webhook(created.row), secret=created.secret
                )
            )

        return await run_mutation(
            self.runtime,
            principal,
            _SERVICE + "CreateWebhook",
            request,
            admin_service_pb2.CreateWebhookResponse,
            work,
        )

    async def ListWebhooks(
        self, request: admin_service_pb2.ListWebhooksRequest, context: _Ctx
    ) -> admin_service_pb2.ListWebhooksResponse:
        principal = current_principal()
        size = page_size(request.page_size, default=50, cap=100)
        after = time_cursor(request.page_token)
        async with connection(self.runtime.pool) as conn:
            rows = await self.service.list_webhooks(conn, principal, limit=size + 1, after=after)
        page, token = _keyset_page(rows, size)
        return admin_service_pb2.ListWebhooksResponse(
            webhooks=[_webhook(r) for r in page], next_page_token=token
        )

    async def DeleteWebhook(
        self, request: admin_service_pb2.DeleteWebhookRequest, context: _Ctx
    ) -> admin_service_pb2.DeleteWebhookResponse:
        principal = current_principal()

        async def work(
            conn: asyncpg.Connection,
        ) -> Outcome[admin_service_pb2.DeleteWebhookResponse]:
            row = await self.service.delete_webhook(
                conn, principal, webhook_id=request.webhook_id, request_id=request.request_id
            )
            return Outcome(admin_service_pb2.DeleteWebhookResponse(webhook=_webhook(row)))

        return await run_mutation(
            self.runtime,
            principal,
            _SERVICE + "DeleteWebhook",
            request,
            admin_service_pb2.DeleteWebhookResponse,
            work,
        )

    async def ListWebhookDeliveries(
        self, request: admin_service_pb2.ListWebhookDeliveriesRequest, context: _Ctx
    ) -> admin_service_pb2.ListWebhookDeliveriesResponse:
        principal = current_principal()
        size = page_size(request.page_size, default=50, cap=100)
        states = _delivery_states(request)
        after = time_cursor(request.page_token)
        async with connection(self.runtime.pool) as conn:
            rows = await self.service.list_webhook_deliveries(
                conn,
                principal,
                webhook_id=request.webhook_id,
                states=states,
                limit=size + 1,
                after=after,
            )
        page, token = _keyset_page(rows, size)
        return admin_service_pb2.ListWebhookDeliveriesResponse(
            deliveries=[_delivery(r) for r in page], next_page_token=token
        )

    async def RetryWebhookDelivery(
        self, request: admin_service_pb2.RetryWebhookDeliveryRequest, context: _Ctx
    ) -> admin_service_pb2.RetryWebhookDeliveryResponse:
        principal = current_principal()

        async def work(
            conn: asyncpg.Connection,
        ) -> Outcome[admin_service_pb2.RetryWebhookDeliveryResponse]:
            row = await self.service.retry_webhook_delivery(
                conn, principal, delivery_id=request.delivery_id, request_id=request.request_id
            )
            return Outcome(admin_service_pb2.RetryWebhookDeliveryResponse(delivery=_delivery(row)))

        return await run_mutation(
            self.runtime,
            principal,
            _SERVICE + "RetryWebhookDelivery",
            request,
            admin_service_pb2.RetryWebhookDeliveryResponse,
            work,
        )

    async def ListAuditLogs(
        self, request: admin_service_pb2.ListAuditLogsRequest, context: _Ctx
    ) -> admin_service_pb2.ListAuditLogsResponse:
        principal = current_principal()
        size = page_size(request.page_size, default=50, cap=100)
        where = _audit_filter(request)
        after = time_cursor(request.page_token)
        async with connection(self.runtime.pool) as conn:
            rows = await self.service.list_audit_logs(
                conn, principal, where=where, limit=size + 1, after=after
            )
        page, token = _keyset_page(rows, size)
        return admin_service_pb2.ListAuditLogsResponse(
            entries=[audit_proto(r) for r in page], next_page_token=token
        )


SERVICER_CLASS = AdminServicer


def create_servicer(runtime: Runtime) -> AdminServicer:
    servicer = AdminServicer(runtime)
    servicer.start_background()
    return servicer


def _keyset_page(rows: Sequence[Any], size: int) -> tuple[Sequence[Any], str]:
    """The first `size` of `size + 1` rows (newest first) and the token of the next page:
    the last row's (created_at, id), empty when nothing follows."""
    page = rows[:size]
    more = len(rows) > size
    return page, encode_page_token(page[-1].created_at.isoformat(), page[-1].id) if more else ""
