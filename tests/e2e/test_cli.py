"""The `classmesh` command's operator subcommands, run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import asyncpg
import jwt

from tests.conftest import create_database, drop_database

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLASSMESH_")}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "classmesh.cli", *args],
        capture_output=True,
        text=True,
        env=base,
        cwd=str(ROOT),
        timeout=120,
    )


def test_config_masks_secrets() -> None:
    out = _cli(
        "config",
        env={
            "CLASSMESH_DATABASE_URL": "postgresql://app:hunter2@db/classmesh",
            "CLASSMESH_S3_SECRET_KEY": "s3cr3t",
            "CLASSMESH_DB_POOL_SIZE": "7",
        },
    )
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    assert cfg["database_url"] == "postgresql://app:****@db/classmesh"
    assert cfg["s3_secret_key"] == "****"
    assert cfg["db_pool_size"] == 7
    assert cfg["listen"] == "127.0.0.1:50051"
    assert "hunter2" not in out.stdout and "s3cr3t" not in out.stdout


def test_bad_config_is_a_clear_error() -> None:
    out = _cli("config", env={"CLASSMESH_DB_POOL_SIZE": "many"})
    assert out.returncode == 2
    assert "CLASSMESH_DB_POOL_SIZE" in out.stderr
    assert "Traceback" not in out.stderr


def test_token_mint_produces_a_verifiable_jwt() -> None:
    out = _cli(
        "token", "mint", "--key-id", "ck_example", "--secret", "s" * 40,
        "--tenant", "00000000-0000-0000-0000-000000000001", "--sub", "u-1",
        "--role", "instructor", "--caps", "publish,moderate", "--ttl", "600",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert jwt.get_unverified_header(token)["kid"] == "ck_example"
    claims = jwt.decode(token, "s" * 40, algorithms=["HS256"])
    assert claims["sub"] == "u-1"
    assert claims["grants"] == {
        "session": "*",
        "role": "instructor",
        "caps": ["publish", "moderate"],
    }
    assert claims["exp"] - claims["iat"] == int(timedelta(minutes=10).total_seconds())


async def test_migrate_and_tenant_create(admin_database_url: str, redis_url: str) -> None:
    dsn = await create_database(admin_database_url)
    env = {"CLASSMESH_DATABASE_URL": dsn, "CLASSMESH_REDIS_URL": redis_url}
    try:
        status = _cli("migrate", "status", env=env)
        assert status.returncode == 0, status.stderr
        up = _cli("migrate", "up", env=env)
        assert up.returncode == 0, up.stderr
        down = _cli("migrate", "down", "--steps", "1", env=env)
        assert down.returncode == 0, down.stderr
        created = _cli("tenant", "create", "acme-university", env=env)
        assert created.returncode == 0, created.stderr
        fields = dict(line.split(": ", 1) for line in created.stdout.strip().splitlines())
        assert set(fields) == {"tenant_id", "key_id", "secret"}
        conn = await asyncpg.connect(dsn)
        try:
            row = await conn.fetchrow(
                "SELECT t.name, k.secret FROM api_keys k JOIN tenants t ON t.id = k.tenant_id "
                "WHERE k.id = $1",
                fields["key_id"],
            )
            applied = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        finally:
            await conn.close()
        assert row is not None and row["name"] == "acme-university"
        assert row["secret"] == fields["secret"]
        files = sorted((ROOT / "migrations").glob("*.up.sql"))
        assert applied == len(files), "tenant create re-applies the rolled-back migration"
        again = _cli("tenant", "create", "acme-university", env=env)
        assert again.returncode != 0
        assert "Traceback" not in again.stderr
    finally:
        await drop_database(admin_database_url, dsn)
