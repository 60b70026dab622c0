"""Shared helpers of the benchmarks: throwaway database, `classmesh up` subprocess, output.

Not a benchmark itself (`make bench` runs `bench/bench_*.py` and `bench/sfu.py --quick`).
Every benchmark measures ClassMesh and the machine's raw limit in the same run and prints
their ratio:
absolute figures drift between runs and machines, ratios much less (FINDINGS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = ROOT / "migrations"
ADMIN_DSN = os.environ.get(
    "CLASSMESH_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("CLASSMESH_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def _with_database(dsn: str, name: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{name}"


@contextlib.asynccontextmanager
async def throwaway_database(*, migrate: bool = True) -> AsyncIterator[str]:
    """A fresh `classmesh_bench_<random>` database (migrated), dropped afterwards."""
    name = f"classmesh_bench_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = _with_database(ADMIN_DSN, name)
    try:
        if migrate:
            from classmesh.core.migrate import migrate_up

            conn = await asyncpg.connect(dsn)
            try:
                await migrate_up(conn, MIGRATIONS_DIR)
            finally:
                await conn.close()
        yield dsn
    finally:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def redis_prefix(bench: str) -> str:
    """A unique Redis prefix, so concurrent runs (and tests) never share keys."""
    return f"cm_bench_{bench}_{secrets.token_hex(4)}"


# ----------------------------------------------------------------------------- subprocesses


@dataclass
class Server:
    """A server subprocess that printed `grpc: host:port` (and maybe a token) when ready."""

    proc: asyncio.subprocess.Process
    target: str = ""
    token: str = ""
    tenant_id: str = ""
    lines: list[str] = field(default_factory=list)

    async def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


async def start_server(
    args: Sequence[str], env: dict[str, str], stderr_path: Path, timeout: float = 60.0
) -> Server:
    """Start `python <args>` and wait for its `ready: ...` line."""
    with stderr_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            env=env,
            cwd=str(ROOT),
        )
    server = Server(proc=proc)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    raise RuntimeError("server exited before it was ready")
                line = raw.decode().rstrip("\n")
                server.lines.append(line)
                key, _, value = line.partition(": ")
                if key == "grpc":
                    server.target = value
                elif key == "token":
                    server.token = value
                elif key == "tenant":
                    server.tenant_id = value
                elif key == "ready":
                    break
    except BaseException:
        await server.stop(5)
        tail = "\n".join(stderr_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(
            "server did not become ready; stdout:\n" + "\n".join(server.lines) + "\n" + tail
        ) from None
    # Keep draining stdout so the child never blocks on a full pipe.
    asyncio.get_running_loop().create_task(_drain(proc.stdout))
    return server


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


def mesh_env(dsn: str, prefix: str, data_dir: Path, **overrides: str) -> dict[str, str]:
    """Environment of `classmesh up` against the machine's PostgreSQL and Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSMESH_")}
    env.update(
        {
            "CLASSMESH_LISTEN": "127.0.0.1:0",
            "CLASSMESH_GATEWAY_LISTEN": "127.0.0.1:0",
            "CLASSMESH_LOG_LEVEL": "INFO",
            "CLASSMESH_DATABASE_URL": dsn,
            "CLASSMESH_REDIS_URL": REDIS_URL,
            "CLASSMESH_REDIS_PREFIX": prefix,
            "CLASSMESH_DATA_DIR": str(data_dir),
        }
    )
    env.update(overrides)
    return env


# ----------------------------------------------------------------------------- figures


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(title)
    print("  " + "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for r in cells:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    print()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def print_json(bench: str, payload: dict[str, object]) -> None:
    print(json.dumps({"bench": bench, **payload}, separators=(",", ":"), sort_keys=False))
