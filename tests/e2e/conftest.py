"""A running `classmesh up` (real subprocess, machine PostgreSQL/Redis) shared by e2e tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import create_database, drop_database
from tests.support.mesh import MeshProcess, start_mesh


@pytest.fixture(scope="session")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[MeshProcess]:
    dsn = await create_database(admin_database_url)
    logdir = tmp_path_factory.mktemp("mesh")
    proc = start_mesh(
        {
            "CLASSMESH_DATABASE_URL": dsn,
            "CLASSMESH_REDIS_URL": redis_url,
            "CLASSMESH_REDIS_PREFIX": f"cm_e2e_{logdir.name}",
            "CLASSMESH_DATA_DIR": str(logdir / "data"),
        },
        str(logdir / "stderr.log"),
    )
    proc.wait_ready()
    yield proc
    if proc.proc.poll() is None:
        proc.terminate()
    proc.kill()
    await drop_database(admin_database_url, dsn)
