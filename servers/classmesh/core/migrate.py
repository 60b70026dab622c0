"""Plain-SQL migration runner behind `classmesh migrate up|down|status`.

Migrations are `migrations/NNNN_name.up.sql` with a matching `.down.sql`. Each one runs in
its own transaction together with its `schema_migrations` row, so a failed migration leaves
nothing half-applied and the recorded version always matches the schema. A session-level
advisory lock serialises runners: two processes starting at once (several replicas, or
`classmesh up` racing a CI job) apply each migration exactly once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

__all__ = [
    "Migration",
    "MigrationError",
    "default_migrations_dir",
    "discover",
    "migrate_down",
    "migrate_up",
    "migration_status",
    "run_migrate_command",
]

#: Advisory lock key ("classmsh" in ASCII) shared by every ClassMesh migration runner.
LOCK_KEY = 0x636C_6173_736D_7368

_FILE_RE = re.compile(r"^(?P<version>\d{4,})_(?P<slug>[a-z0-9_]+)\.(?P<dir>up|down)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     bigint      PRIMARY KEY,
    name        text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migrations directory or the recorded history is not usable as it stands."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered migration on disk."""

    version: int
    name: str
    up_path: Path
    down_path: Path


def default_migrations_dir() -> Path:
    """Where migrations live when no directory is given.

    `CLASSMESH_MIGRATIONS_DIR` wins (packaged deployments); else `classmesh/migrations`
    next to this package (a wheel may ship them there); else the repository's
    `migrations/` (source checkout and editable installs).
    """
    explicit = os.environ.get("CLASSMESH_MIGRATIONS_DIR")
    if explicit:
        return Path(explicit)
    here = Path(__file__).resolve()
    candidates = [here.parent.parent / "migrations", here.parents[3] / "migrations"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise MigrationError(
        "no migrations directory found; set CLASSMESH_MIGRATIONS_DIR "
        f"(looked in {', '.join(str(c) for c in candidates)})"
    )


def discover(migrations_dir: Path | None = None) -> list[Migration]:
    """Migrations on disk in version order; refuses gaps in pairs and duplicate versions."""
    directory = migrations_dir or default_migrations_dir()
    if not directory.is_dir():
        raise MigrationError(f"migrations directory {directory} does not exist")
    ups: dict[int, Path] = {}
    downs: dict[int, Path] = {}
    names: dict[int, str] = {}
    for path in sorted(directory.iterdir()):
        match = _FILE_RE.match(path.name)
        if not match:
            continue
        version = int(match["version"])
        name = f"{match['version']}_{match['slug']}"
        if names.setdefault(version, name) != name:
            raise MigrationError(
                f"two migrations share version {version}: {names[version]}, {name}"
            )
        (ups if match["dir"] == "up" else downs)[version] = path
    out: list[Migration] = []
    for version in sorted(names):
        if version not in ups or version not in downs:
            raise MigrationError(f"migration {names[version]} needs both .up.sql and .down.sql")
        out.append(Migration(version, names[version], ups[version], downs[version]))
    return out


async def _lock(conn: asyncpg.Connection) -> None:
    if conn.is_in_transaction():
        # each migration commits on its own; inside an outer transaction it would not
        raise MigrationError("run migrations on a connection outside any transaction")
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    await conn.execute(_CREATE_TABLE)


async def _unlock(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


async def _applied(conn: asyncpg.Connection) -> dict[int, str]:
    rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    return {int(r["version"]): str(r["name"]) for r in rows}


async def migrate_up(conn: asyncpg.Connection, migrations_dir: Path | None = None) -> list[str]:
    """Apply every pending migration in order; returns the names applied (may be empty)."""
    migrations = discover(migrations_dir)
    await _lock(conn)
    try:
        applied = await _applied(conn)
        done: list[str] = []
        for m in migrations:
            if m.version in applied:
                continue
            sql = m.up_path.read_text(encoding="utf-8")
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    m.version,
                    m.name,
                )
            done.append(m.name)
        return done
    finally:
        await _unlock(conn)


async def migrate_down(
    conn: asyncpg.Connection, migrations_dir: Path | None = None, steps: int = 1
) -> list[str]:
    """Revert the newest `steps` applied migrations; returns the names reverted, newest first.

    Fewer are reverted when fewer are applied, so a large `steps` means "all the way".
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    by_version = {m.version: m for m in discover(migrations_dir)}
    await _lock(conn)
    try:
        applied = await _applied(conn)
        done: list[str] = []
        for version in sorted(applied, reverse=True)[:steps]:
            m = by_version.get(version)
            if m is None:
                raise MigrationError(
                    f"migration {applied[version]} is applied but has no files to revert it"
                )
            sql = m.down_path.read_text(encoding="utf-8")
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("DELETE FROM schema_migrations WHERE version = $1", version)
            done.append(m.name)
        return done
    finally:
        await _unlock(conn)


async def migration_status(
    conn: asyncpg.Connection, migrations_dir: Path | None = None
) -> list[tuple[str, bool]]:
    """(name, applied) for every migration on disk, plus applied ones missing from disk."""
    migrations = discover(migrations_dir)
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    applied = await _applied(conn) if exists else {}
    status = [(m.name, m.version in applied) for m in migrations]
    on_disk = {m.version for m in migrations}
    status += [(name, True) for version, name in sorted(applied.items()) if version not in on_disk]
    status.sort(key=lambda item: item[0])
    return status


async def run_migrate_command(dsn: str, action: str, steps: int = 1) -> str:
    """Run `up`, `down` or `status` against `dsn` and return the text to print."""
    if action not in {"up", "down", "status"}:
        raise ValueError(f"unknown migrate action {action!r}: use up, down or status")
    conn = await asyncpg.connect(dsn)
    try:
        if action == "up":
            names = await migrate_up(conn)
            if not names:
                return "already up to date"
            return "\n".join(f"applied  {name}" for name in names)
        if action == "down":
            names = await migrate_down(conn, steps=steps)
            if not names:
                return "nothing to revert"
            return "\n".join(f"reverted {name}" for name in names)
        rows = await migration_status(conn)
        if not rows:
            return "no migrations found"
        return "\n".join(f"{'applied' if done else 'pending'}  {name}" for name, done in rows)
    finally:
        await conn.close()
