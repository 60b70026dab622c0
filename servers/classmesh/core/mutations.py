"""One path for every mutating RPC: transaction + idempotency + event publish after commit.

    response = await run_mutation(
        runtime, principal, "/classmesh.admin.v1.AdminService/CreateApiKey", request,
        AdminPb.CreateApiKeyResponse, lambda conn: service.create_api_key(conn, ...),
    )

`work` runs inside one PostgreSQL transaction together with the idempotency record, so
the effect and the stored response commit or roll back together. A repeat of the same
`request_id` (even concurrently: it waits on the key's row) returns the stored response
bytes unchanged; the same key with a different request is `ALREADY_EXISTS`
(`IDEMPOTENCY_KEY_REUSED`). Events the work appended are published on the bus only after
the commit. An empty `request_id` means "not idempotent": the work runs once per call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import asyncpg
from google.protobuf.message import Message

from classmesh.core import idempotency
from classmesh.core.auth import Principal
from classmesh.core.db import transaction
from classmesh.core.events import EventRecord
from classmesh.core.runtime import Runtime

__all__ = ["Outcome", "run_mutation"]

R = TypeVar("R", bound=Message)


@dataclass
class Outcome(Generic[R]):
    """What a mutation produced: the response and the events to publish after commit."""

    response: R
    events: Sequence[EventRecord] = field(default_factory=list)


def _request_bytes_without_id(request: Message) -> bytes:
    copy = type(request)()
    copy.CopyFrom(request)
    if "request_id" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("request_id")
    return copy.SerializeToString(deterministic=True)


async def run_mutation(
    runtime: Runtime,
    principal: Principal,
    method: str,
    request: Message,
    response_type: type[R],
    work: Callable[[asyncpg.Connection], Awaitable[Outcome[R]]],
) -> R:
    request_id: str = getattr(request, "request_id", "") or ""
    events: Sequence[EventRecord] = ()
    async with transaction(runtime.pool) as conn:
        if request_id:
            stored = await idempotency.begin(
                conn,
                tenant_id=principal.tenant_id,
                request_id=request_id,
                method=method,
                fingerprint=idempotency.fingerprint(method, _request_bytes_without_id(request)),
                ttl_hours=runtime.config.idempotency_ttl_hours,
            )
            if stored is not None:
                return response_type.FromString(stored)
        outcome = await work(conn)
        events = outcome.events
        if request_id:
            await idempotency.finish(
                conn,
                tenant_id=principal.tenant_id,
                request_id=request_id,
                response=outcome.response.SerializeToString(deterministic=True),
            )
    for record in events:
        await runtime.bus.publish(record)
    return outcome.response
