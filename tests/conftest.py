"""Shared test set-up: real PostgreSQL and Redis, a throwaway database per run.

Order of preference (SERVICES.md): `CLASSMESH_TEST_DATABASE_URL` / `CLASSMESH_TEST_REDIS_URL`;
else the machine's services on 127.0.0.1; else start them with the documented commands.
If none works the run fails loudly: these tests never skip for a missing service.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = ROOT / "migrations"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
START_PG = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
START_REDIS = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
    "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
)


def _pg_reachable(dsn: str) -> bool:
    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(dsn, timeout=3)
        except Exception:
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


def _redis_reachable(url: str) -> bool:
    async def probe() -> bool:
        client = aioredis.from_url(url, socket_connect_timeout=2)
        try:
            return bool(await client.ping())
        except Exception:
            return False
        finally:
            await client.aclose()

    return asyncio.run(probe())


def _ensure(name: str, url: str, reachable: object, start_cmd: str) -> str:
    assert callable(reachable)
    if reachable(url):
        return url
    subprocess.run(start_cmd, shell=True, check=False, timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if reachable(url):
            return url
        time.sleep(0.5)
    pytest.exit(
        f"{name} is not reachable at {url} and could not be started with: {start_cmd}. "
        f"Set CLASSMESH_TEST_{name.upper()}_URL to a running server.",
        returncode=3,
    )


@pytest.fixture(scope="session")
def admin_database_url() -> str:
    """DSN of a maintenance database on the server the tests use."""
    explicit = os.environ.get("CLASSMESH_TEST_DATABASE_URL")
    if explicit:
        return _ensure("database", explicit, _pg_reachable, START_PG)
    return _ensure("database", DEFAULT_PG, _pg_reachable, START_PG)


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("CLASSMESH_TEST_REDIS_URL", DEFAULT_REDIS)
    return _ensure("redis", url, _redis_reachable, START_REDIS)


def _with_database(dsn: str, name: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{name}"


async def create_database(admin_dsn: str) -> str:
    """Create an empty throwaway database and return its DSN."""
    name = f"classmesh_test_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _with_database(admin_dsn, name)


async def drop_database(admin_dsn: str, dsn: str) -> None:
    name = dsn.rpartition("/")[2]
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def database_url(admin_database_url: str) -> AsyncIterator[str]:
    """A migrated throwaway database for this run, dropped afterwards."""
    from classmesh.core.migrate import migrate_up

    dsn = await create_database(admin_database_url)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate_up(conn, MIGRATIONS_DIR)
    finally:
        await conn.close()
    yield dsn
    await drop_database(admin_database_url, dsn)


@pytest.fixture
async def empty_database_url(admin_database_url: str) -> AsyncIterator[str]:
    """A fresh database with no schema, for migration tests."""
    dsn = await create_database(admin_database_url)
    yield dsn
    await drop_database(admin_database_url, dsn)


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=20)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def redis_prefix() -> str:
    """A key prefix of this run, so runs sharing one Redis never see each other's keys."""
    return f"classmesh_test_{secrets.token_hex(4)}"


@pytest.fixture
async def redis_client(redis_url: str, redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    async for key in client.scan_iter(match=f"{redis_prefix}*"):
        await client.delete(key)
    await client.aclose()


@pytest.fixture(scope="session")
def root_dir() -> Iterator[Path]:
    yield ROOT
