"""Idempotent mutations: `request_id` -> the first response, replayed for at least 24 h.

The one mechanism every mutating RPC uses (STYLE rule 3). Inside the transaction that does
the work::

    async with transaction(pool) as conn:
        stored = await idempotency.begin(conn, tenant_id=..., request_id=...,
                                         method=..., fingerprint=fp)
        if stored is not None:
            return Response.FromString(stored)     # a repeat: no effect, same answer
        response = await do_the_work(conn)         # table changes + append_event
        await idempotency.finish(conn, tenant_id=..., request_id=...,
                                 response=response.SerializeToString())
    return response

Why this is exactly-once: `begin` inserts the key row in the caller's transaction. A
concurrent duplicate's INSERT blocks on the primary key until the first transaction ends;
if it commits, the duplicate reads the stored response (READ COMMITTED sees the row
committed while it waited); if it rolls back, the duplicate proceeds as the first. The
effect, the key and the response commit or vanish together, so a failed attempt (domain
error, crash) stores nothing and a retry runs again.

Errors, for the lead's mapping (ARCHITECTURE "API conventions"):

- `IdempotencyKeyReused`: same tenant + request_id, different method or request body ->
  `ALREADY_EXISTS`, ErrorInfo reason `IDEMPOTENCY_KEY_REUSED`.
- `IdempotencyKeyInProgress`: the key was committed without a response (a caller that
  skipped `finish`) -> `ABORTED`; should never happen with the pattern above.
- `InvalidRequestId` (a ValueError): request_id empty or over 128 characters ->
  `INVALID_ARGUMENT` with a BadRequest field violation on `request_id`.
"""

from __future__ import annotations

import hashlib
import uuid

import asyncpg
from google.protobuf.message import Message

__all__ = [
    "IdempotencyKeyInProgress",
    "IdempotencyKeyReused",
    "InvalidRequestId",
    "MAX_REQUEST_ID_LENGTH",
    "MIN_TTL_HOURS",
    "begin",
    "finish",
    "fingerprint",
    "fingerprint_message",
    "purge_expired",
]

MAX_REQUEST_ID_LENGTH = 128
MIN_TTL_HOURS = 24
_PURGE_BATCH = 5000


class IdempotencyKeyReused(Exception):
    """The request_id was already used by this tenant for a different request."""

    def __init__(self, request_id: str, method: str, stored_method: str) -> None:
        super().__init__(
            f"request_id {request_id!r} was already used for a different request"
            + (f" ({stored_method})" if stored_method != method else "")
        )
        self.request_id = request_id
        self.method = method
        self.stored_method = stored_method


class IdempotencyKeyInProgress(Exception):
    """The key exists but holds no response: its first use never finished."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request_id {request_id!r} has no stored response")
        self.request_id = request_id


class InvalidRequestId(ValueError):
    """request_id is empty or longer than MAX_REQUEST_ID_LENGTH."""


def fingerprint(method: str, request_bytes: bytes) -> bytes:
    """sha256 over the method and the request serialised without its request_id.

    The method is part of the hash (NUL-separated, so no method/body split collides): the
    same key sent to two RPCs is a reuse, not a replay.
    """
    digest = hashlib.sha256()
    digest.update(method.encode("utf-8"))
    digest.update(b"\x00")
    digest.update(request_bytes)
    return digest.digest()


def fingerprint_message(method: str, request: Message) -> bytes:
    """`fingerprint` of a protobuf request, ignoring its `request_id` field.

    Deterministic serialisation so map fields hash the same on every call.
    """
    body = request
    if "request_id" in request.DESCRIPTOR.fields_by_name:
        body = type(request)()
        body.CopyFrom(request)
        body.ClearField("request_id")
    return fingerprint(method, body.SerializeToString(deterministic=True))


def _check(conn: asyncpg.Connection, request_id: str) -> None:
    if not conn.is_in_transaction():
        raise RuntimeError("idempotency.begin/finish must run inside the caller's transaction")
    if not 1 <= len(request_id) <= MAX_REQUEST_ID_LENGTH:
        raise InvalidRequestId(
            f"request_id must be 1..{MAX_REQUEST_ID_LENGTH} characters, got {len(request_id)}"
        )


async def begin(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    request_id: str,
    method: str,
    fingerprint: bytes,
    ttl_hours: int = MIN_TTL_HOURS,
) -> bytes | None:
    """Claim `request_id` for this request; returns the stored response of an earlier one.

    None means "first time: do the work, then call `finish`". Must run in a READ COMMITTED
    transaction (the default of `db.transaction`), which lets a blocked duplicate see the
    winner's row once it commits.
    """
    _check(conn, request_id)
    if ttl_hours < MIN_TTL_HOURS:
        raise ValueError(f"ttl_hours must be at least {MIN_TTL_HOURS}")
    tenant = uuid.UUID(tenant_id)
    ttl = int(ttl_hours)
    # A row deleted by purge_expired between the INSERT and the SELECT sends us round again.
    for _ in range(3):
        inserted = await conn.fetchval(
            "INSERT INTO idempotency_keys "
            "(tenant_id, request_id, method, fingerprint, created_at, expires_at) "
            "VALUES ($1, $2, $3, $4, now(), now() + make_interval(hours => $5::int)) "
            "ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING true",
            tenant,
            request_id,
            method,
            fingerprint,
            ttl,
        )
        if inserted:
            return None
        row = await conn.fetchrow(
            "SELECT method, fingerprint, response, expires_at <= now() AS expired "
            "FROM idempotency_keys WHERE tenant_id = $1 AND request_id = $2 FOR UPDATE",
            tenant,
            request_id,
        )
        if row is None:
            continue
        if row["expired"]:
            # Past its TTL the key is free again: the row becomes this request's claim.
            await conn.execute(
                "UPDATE idempotency_keys SET method = $3, fingerprint = $4, response = NULL, "
                "created_at = now(), expires_at = now() + make_interval(hours => $5::int) "
                "WHERE tenant_id = $1 AND request_id = $2",
                tenant,
                request_id,
                method,
                fingerprint,
                ttl,
            )
            return None
        if row["method"] != method or bytes(row["fingerprint"]) != fingerprint:
            raise IdempotencyKeyReused(request_id, method, str(row["method"]))
        response = row["response"]
        if response is None:
            raise IdempotencyKeyInProgress(request_id)
        return bytes(response)
    raise IdempotencyKeyInProgress(request_id)


async def finish(
    conn: asyncpg.Connection, *, tenant_id: str, request_id: str, response: bytes
) -> None:
    """Store the response a repeat of this request will get; same transaction as `begin`."""
    _check(conn, request_id)
    status = await conn.execute(
        "UPDATE idempotency_keys SET response = $3 "
        "WHERE tenant_id = $1 AND request_id = $2 AND response IS NULL",
        uuid.UUID(tenant_id),
        request_id,
        response,
    )
    if status != "UPDATE 1":
        raise RuntimeError(f"idempotency.finish for {request_id!r} without a matching begin")


async def purge_expired(pool: asyncpg.Pool) -> int:
    """Delete expired keys in small batches (short locks); returns how many went."""
    total = 0
    while True:
        status = await pool.execute(
            "DELETE FROM idempotency_keys WHERE ctid IN ("
            "SELECT ctid FROM idempotency_keys WHERE expires_at <= now() "
            "LIMIT $1 FOR UPDATE SKIP LOCKED)",
            _PURGE_BATCH,
        )
        count = int(status.rsplit(" ", 1)[1])
        total += count
        if count < _PURGE_BATCH:
            return total
