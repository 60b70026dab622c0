"""gRPC edge of AdminService: protobuf <-> domain, nothing else.

Implemented: GetTenant, CreateApiKey, ListApiKeys, RevokeApiKey. The others (UpdateTenant,
webhooks, ListAuditLogs) answer UNIMPLEMENTED from the generated base (README status table).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import grpc

from classmesh.admin.service import AdminService, api_key_cursor
from classmesh.admin.store import ApiKeyRow
from classmesh.admin.v1 import admin_pb2, admin_service_pb2, admin_service_pb2_grpc
from classmesh.core.auth import current_principal
from classmesh.core.db import connection
from classmesh.core.errors import InvalidArgument
from classmesh.core.mutations import Outcome, run_mutation
from classmesh.core.paging import encode_page_token, page_size
from classmesh.core.runtime import Runtime
from classmesh.core.timeutil import to_timestamp

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


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, runtime: Runtime, service: AdminService | None = None) -> None:
        self.runtime = runtime
        self.service = service or AdminService()

    async def GetTenant(
        self, request: admin_service_pb2.GetTenantRequest, context: _Ctx
    ) -> admin_service_pb2.GetTenantResponse:
        principal = current_principal()
        async with connection(self.runtime.pool) as conn:
            tenant = await self.service.get_tenant(conn, principal)
        out = admin_pb2.Tenant(
            id=tenant.id, name=tenant.name, status=admin_pb2.TENANT_STATUS_ACTIVE
        )
        out.create_time.CopyFrom(to_timestamp(tenant.created_at))
        return admin_service_pb2.GetTenantResponse(tenant=out)

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
        page, more = rows[:size], len(rows) > size
        token = encode_page_token(page[-1].created_at.isoformat(), page[-1].id) if more else ""
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


SERVICER_CLASS = AdminServicer


def create_servicer(runtime: Runtime) -> AdminServicer:
    return AdminServicer(runtime)  # type: ignore[abstract]  # the rest: UNIMPLEMENTED
