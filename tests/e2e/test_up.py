"""`classmesh up` as operators run it: health, reflection, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from classmesh.core.server import SERVICES
from tests.conftest import create_database, drop_database
from tests.support.mesh import MeshProcess, start_mesh


async def _all_serving(target: str, deadline_s: float = 30.0) -> dict[str, str]:
    """Poll health for every service name until all are SERVING (or the deadline passes)."""
    statuses: dict[str, str] = {}
    end = time.monotonic() + deadline_s
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < end:
            for name in ["", *SERVICES.values()]:
                try:
                    resp = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
                    statuses[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                except grpc.aio.AioRpcError as err:
                    statuses[name] = err.code().name
            if all(s == "SERVING" for s in statuses.values()):
                break
            await asyncio.sleep(0.2)
    return statuses


async def _reflected_services(target: str) -> set[str]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        resp = await call.read()
        await call.done_writing()
        call.cancel()
    assert not isinstance(resp, type(grpc.aio.EOF))
    return {s.name for s in resp.list_services_response.service}


async def _check_lifecycle(mesh: MeshProcess) -> None:
    try:
        mesh.wait_ready(timeout=60)
        assert mesh.token.count(".") == 2, "up must print an admin JWT"
        statuses = await _all_serving(mesh.target)
        assert statuses and all(s == "SERVING" for s in statuses.values()), statuses
        names = await _reflected_services(mesh.target)
        assert set(SERVICES.values()) <= names, names
        assert "grpc.health.v1.Health" in names
        start = time.monotonic()
        code = await asyncio.to_thread(mesh.terminate, 10.0)
        assert code == 0, mesh.stderr_tail()
        assert time.monotonic() - start < 10.0
    finally:
        mesh.kill()


async def test_up_against_machine_services(
    admin_database_url: str, redis_url: str, tmp_path: Path
) -> None:
    dsn = await create_database(admin_database_url)
    try:
        mesh = start_mesh(
            {
                "CLASSMESH_DATABASE_URL": dsn,
                "CLASSMESH_REDIS_URL": redis_url,
                "CLASSMESH_REDIS_PREFIX": f"cm_up_{tmp_path.name}",
                "CLASSMESH_DATA_DIR": str(tmp_path / "data"),
            },
            str(tmp_path / "stderr.log"),
        )
        await _check_lifecycle(mesh)
    finally:
        await drop_database(admin_database_url, dsn)


async def test_up_on_embedded_default(tmp_path: Path) -> None:
    mesh = start_mesh({"CLASSMESH_DATA_DIR": str(tmp_path / "data")}, str(tmp_path / "stderr.log"))
    await _check_lifecycle(mesh)
    # The embedded Redis stopped with the mesh (redis-server removes its socket on exit).
    assert not (tmp_path / "data" / "redis" / "redis.sock").exists()


def _gateway_children(pid: int) -> list[int]:
    """Live children of `pid` running `classmesh ... serve gateway`."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == pid and stat[0] != "Z" and b"serve" in cmd and b"gateway" in cmd:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
async def test_up_runs_the_gateway_in_a_child_that_dies_with_it(
    admin_database_url: str, redis_url: str, tmp_path: Path, how: signal.Signals
) -> None:
    dsn = await create_database(admin_database_url)
    try:
        mesh = start_mesh(
            {
                "CLASSMESH_DATABASE_URL": dsn,
                "CLASSMESH_REDIS_URL": redis_url,
                "CLASSMESH_REDIS_PREFIX": f"cm_up_{tmp_path.name}",
                "CLASSMESH_DATA_DIR": str(tmp_path / "data"),
            },
            str(tmp_path / "stderr.log"),
        )
        try:
            mesh.wait_ready()
            children = _gateway_children(mesh.proc.pid)
            assert len(children) == 1, mesh.stderr_tail()
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{mesh.gateway}/healthz") as resp:
                    assert resp.status == 200
            mesh.proc.send_signal(how)
            mesh.proc.wait(timeout=15)
            deadline = time.monotonic() + 5
            while _gateway_children(mesh.proc.pid) or _alive(children[0]):
                assert time.monotonic() < deadline, f"gateway outlived classmesh up ({how.name})"
                await asyncio.sleep(0.1)
        finally:
            mesh.kill()
    finally:
        await drop_database(admin_database_url, dsn)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
