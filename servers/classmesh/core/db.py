"""The asyncpg pool and the transaction helper.

Stores take a `Connection` and never the pool (STYLE rule 5); the service layer opens the
transaction with `transaction(pool)` so a table change and its event commit together.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal, cast

import asyncpg

__all__ = ["connection", "create_pool", "transaction", "init_connection"]

IsolationLevel = Literal["read_committed", "repeatable_read", "serializable"]


def _encode_json(value: Any) -> str:
    # A `str` is taken as JSON text that is already serialised: callers written against a
    # codec-less connection (e.g. `$1::jsonb` with `json.dumps(...)`) keep working unchanged.
    # The price: a bare JSON string scalar must be passed as json.dumps("text").
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


async def init_connection(conn: asyncpg.Connection) -> None:
    """Decode json/jsonb to Python objects, so stores never call json.loads themselves."""
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name,
            encoder=_encode_json,
            decoder=json.loads,
            schema="pg_catalog",
            format="text",
        )


async def _release_reset(conn: asyncpg.Connection) -> None:
    """Reset on release without asyncpg's full reset query (one round trip per release).

    ClassMesh never leaves session state on a pooled connection (no SET, LISTEN, held
    cursors or session-level advisory locks: those use their own connections), so only a
    transaction left open by a failure needs undoing.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 20) -> asyncpg.Pool:
    """Open the process-wide pool; every connection gets the JSON codecs."""
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=init_connection, reset=_release_reset
    )
    if pool is None:  # only when asyncpg is told not to initialise; keeps mypy honest
        raise RuntimeError("asyncpg.create_pool returned no pool")
    return pool


@asynccontextmanager
async def transaction(
    pool: asyncpg.Pool, *, isolation: IsolationLevel = "read_committed"
) -> AsyncIterator[asyncpg.Connection]:
    """Borrow a connection for one transaction: commit on exit, roll back on an exception.

    READ COMMITTED is the default on purpose: row locks (`FOR UPDATE`, the event log's
    `UPDATE sessions ... last_seq`) and `idempotency.begin` rely on each statement seeing
    rows committed while it waited.
    """
    async with pool.acquire() as conn:
        async with conn.transaction(isolation=isolation):
            # The pool hands out a proxy that forwards every Connection method; stores are
            # typed against Connection, so present it as one.
            yield cast(asyncpg.Connection, conn)


@asynccontextmanager
async def connection(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """Borrow a connection outside a transaction (single-statement reads)."""
    async with pool.acquire() as conn:
        yield cast(asyncpg.Connection, conn)
