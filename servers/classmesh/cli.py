"""The `classmesh` command: run the mesh, migrate, manage tenants, mint tokens."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Coroutine, Sequence
from datetime import timedelta
from typing import Any

import asyncpg

from classmesh.core.config import Config, ConfigError, load_config
from classmesh.core.logs import configure_logging

__all__ = ["main"]

log = logging.getLogger("classmesh.cli")

ALL_CAPS = ["publish", "subscribe", "chat", "moderate", "record", "admin"]


def _print(line: str) -> None:
    print(line, flush=True)


async def _resolve_backends(cfg: Config) -> tuple[str, str, object | None]:
    """DSN and Redis URL to use, starting embedded servers for whatever is unset."""
    if cfg.database_url and cfg.redis_url:
        return cfg.database_url, cfg.redis_url, None
    from classmesh.core.embedded import start_embedded

    embedded = await asyncio.to_thread(
        start_embedded,
        cfg.data_dir,
        need_database=cfg.database_url is None,
        need_redis=cfg.redis_url is None,
    )
    dsn = cfg.database_url or embedded.database_url
    url = cfg.redis_url or embedded.redis_url
    assert dsn is not None and url is not None
    return dsn, url, embedded


async def _migrate(dsn: str) -> list[str]:
    from classmesh.core.migrate import migrate_up

    conn = await asyncpg.connect(dsn)
    try:
        return await migrate_up(conn)
    finally:
        await conn.close()


async def _start_gateway(cfg: Config, default_target: str) -> Any:
    """The grpc-web gateway on CLASSMESH_GATEWAY_LISTEN in front of `default_target`
    (services named in CLASSMESH_GATEWAY_UPSTREAMS go where it says)."""
    from classmesh.core.server import SERVICES
    from classmesh.gateway import GatewaySettings, mesh_routes, parse_upstreams, start_gateway

    try:
        upstreams = parse_upstreams(cfg.gateway_upstreams, SERVICES)
        routes = mesh_routes(default_target, upstreams)
        settings = GatewaySettings.from_config(cfg)
        gateway = await start_gateway(settings, routes, cfg.gateway_listen)
    except (OSError, ValueError) as exc:
        raise _GatewayError(
            f"gateway on CLASSMESH_GATEWAY_LISTEN={cfg.gateway_listen!r}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from exc
    _print(f"gateway: {gateway.url}")
    return gateway


class _GatewayChild:
    """`classmesh serve gateway` as a child of `classmesh up`, in front of the mesh.

    Its own process, so its HTTP work and its gRPC client calls do not share the mesh's
    event loop (measured: 0.49 -> 0.68 of direct gRPC at 64 calls in flight on 2 cores,
    bench/gateway.py). It dies with `up` (PR_SET_PDEATHSIG) and stops on its SIGTERM.
    """

    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url
        assert proc.stdout is not None
        # Drain what it prints after `ready:` so it never blocks on a full pipe.
        self._drain = asyncio.create_task(self._forward(proc.stdout))
        self._logs: asyncio.Task[None] | None = None

    @staticmethod
    async def _forward(stream: asyncio.StreamReader) -> None:
        while await stream.readline():
            pass

    @classmethod
    async def start(cls, cfg: Config, upstream: str) -> _GatewayChild:
        import os

        from classmesh.core.proc import die_with_parent

        env = dict(os.environ)
        env["CLASSMESH_GATEWAY_LISTEN"] = cfg.gateway_listen
        env["CLASSMESH_PEER_TARGET"] = upstream
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "classmesh.cli",
            "serve",
            "gateway",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        assert proc.stdout is not None and proc.stderr is not None
        url = ""
        try:
            async with asyncio.timeout(30):
                while line := (await proc.stdout.readline()).decode().strip():
                    if line.startswith("gateway: "):
                        url = line.removeprefix("gateway: ")
                    elif line == "ready: gateway":
                        break
        except TimeoutError:
            proc.kill()
        if proc.returncode is not None or not url:
            await proc.wait()
            errors = (await proc.stderr.read()).decode(errors="replace").strip().splitlines()
            last = next((e for e in reversed(errors) if e.startswith("classmesh: ")), "")
            raise _GatewayError(
                last.removeprefix("classmesh: ")
                or f"gateway process ended with exit code {proc.returncode}"
            )
        child = cls(proc, url)
        # From now on its logs go where ours go.
        child._logs = asyncio.create_task(child._copy(proc.stderr))
        return child

    @staticmethod
    async def _copy(stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            sys.stderr.write(line.decode(errors="replace"))
            sys.stderr.flush()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await self.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        self._drain.cancel()
        if self._logs is not None:
            with contextlib.suppress(TimeoutError):  # its last lines (shutdown logs)
                await asyncio.wait_for(asyncio.shield(self._logs), 1)


class _GatewayError(Exception):
    """The gateway cannot start (address in use, bad upstream map): one line, exit 2."""


async def _serve_gateway(cfg: Config) -> int:
    """`classmesh serve gateway`: the gateway alone (no database, no Redis)."""
    from classmesh.core.server import wait_for_shutdown

    if not cfg.gateway_listen:
        print("classmesh: CLASSMESH_GATEWAY_LISTEN is empty", file=sys.stderr)
        return 2
    try:
        gateway = await _start_gateway(cfg, cfg.effective_peer_target)
    except _GatewayError as exc:
        print(f"classmesh: {exc}", file=sys.stderr)
        return 2
    _print("ready: gateway")
    sig = await wait_for_shutdown()
    log.info("shutting down", extra={"signal": sig})
    await gateway.stop()
    return 0


async def _serve(cfg: Config, shorts: Sequence[str], *, dev_token: bool) -> int:
    from classmesh.core.runtime import open_runtime
    from classmesh.core.server import start_server, wait_for_shutdown

    dsn, redis_url, embedded = await _resolve_backends(cfg)
    try:
        applied = await _migrate(dsn)
        if applied:
            log.info("migrations applied", extra={"migrations": applied})
        runtime = await open_runtime(cfg, database_url=dsn, redis_url=redis_url)
        gateway: Any = None
        try:
            mesh = await start_server(runtime, shorts, cfg.listen)
            host = cfg.listen.rsplit(":", 1)[0]
            _print(f"grpc: {host}:{mesh.port}")
            if dev_token and cfg.gateway_listen:  # `up`: the gateway beside the mesh
                try:
                    gateway = await _GatewayChild.start(cfg, runtime.peer_target)
                    _print(f"gateway: {gateway.url}")
                except _GatewayError as exc:
                    print(f"classmesh: {exc}", file=sys.stderr)
                    await mesh.stop(0)
                    return 2
            if dev_token:
                from classmesh.admin.service import dev_bootstrap

                boot = await dev_bootstrap(runtime.pool, cfg.dev_tenant)
                _print(f"tenant: {boot.tenant_id}")
                _print(f"token: {boot.token}")
            _print("ready: " + ", ".join(mesh.services))
            sig = await wait_for_shutdown()
            log.info("shutting down", extra={"signal": sig})
            if gateway is not None:
                await gateway.stop()
                gateway = None
            await mesh.stop(cfg.shutdown_grace_seconds)
        finally:
            if gateway is not None:
                await gateway.stop()
            await runtime.close()
    finally:
        stop = getattr(embedded, "stop", None)
        if callable(stop):
            await asyncio.to_thread(stop)
    return 0


async def _tenant_create(cfg: Config, name: str) -> int:
    from classmesh.admin.service import create_tenant_with_key

    dsn, _redis, embedded = await _resolve_backends(cfg)
    try:
        await _migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            created = await create_tenant_with_key(conn, name)
        finally:
            await conn.close()
    finally:
        stop = getattr(embedded, "stop", None)
        if callable(stop):
            await asyncio.to_thread(stop)
    _print(f"tenant_id: {created.tenant_id}")
    _print(f"key_id: {created.key_id}")
    _print(f"secret: {created.secret}")
    return 0


async def _migrate_command(cfg: Config, action: str, steps: int) -> int:
    from classmesh.core.migrate import run_migrate_command

    dsn, _redis, embedded = await _resolve_backends(cfg)
    try:
        _print(await run_migrate_command(dsn, action, steps))
    finally:
        stop = getattr(embedded, "stop", None)
        if callable(stop):
            await asyncio.to_thread(stop)
    return 0


async def _seed_study_rooms(cfg: Config, tenant_id: str) -> int:
    from classmesh.session.service import SessionService

    dsn, _redis, embedded = await _resolve_backends(cfg)
    try:
        await _migrate(dsn)
        from classmesh.core.db import init_connection

        conn = await asyncpg.connect(dsn)
        try:
            await init_connection(conn)
            rooms, created = await SessionService(cfg).seed_study_rooms(conn, tenant_id)
        finally:
            await conn.close()
    finally:
        stop = getattr(embedded, "stop", None)
        if callable(stop):
            await asyncio.to_thread(stop)
    for room in rooms:
        _print(f"{room.id}  {room.title}  {room.capacity} seats")
    _print(f"created: {created}")
    return 0


async def _retention_run(cfg: Config, chat_days: int | None) -> int:
    """Delete chat messages older than the retention window (and their text in the log)."""
    from classmesh.core.db import init_connection
    from classmesh.interaction.store import InteractionStore

    days = cfg.chat_retention_days if chat_days is None else chat_days
    if days < 1:
        print("classmesh: --chat-days must be at least 1", file=sys.stderr)
        return 2
    dsn, _redis, embedded = await _resolve_backends(cfg)
    try:
        await _migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await init_connection(conn)
            async with conn.transaction():
                deleted = await InteractionStore().purge_chat(conn, older_than_days=days)
        finally:
            await conn.close()
    finally:
        stop = getattr(embedded, "stop", None)
        if callable(stop):
            await asyncio.to_thread(stop)
    _print(f"chat_retention_days: {days}")
    _print(f"chat_messages_deleted: {deleted}")
    return 0


def _mint(args: argparse.Namespace) -> int:
    from classmesh.core.auth import AccessToken

    caps = [c for c in (args.caps or "").split(",") if c]
    token = (
        AccessToken(args.key_id, args.secret)
        .with_tenant(args.tenant)
        .with_identity(args.sub, args.name or args.sub)
        .with_grants(session=args.session, role=args.role, caps=caps)
        .with_ttl(timedelta(seconds=args.ttl))
        .to_jwt()
    )
    _print(token)
    return 0


def _run_server(main: Coroutine[Any, Any, int]) -> int:
    """Run the server on uvloop (measured faster for gRPC and asyncpg), asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="classmesh", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run every service on one port (embedded PostgreSQL/Redis if unset)")
    serve = sub.add_parser("serve", help="run one service")
    serve.add_argument("service", choices=sorted([*_services(), "gateway"]))
    sub.add_parser("config", help="print the effective configuration (secrets masked)")
    mig = sub.add_parser("migrate", help="apply or roll back database migrations")
    mig.add_argument("action", choices=["up", "down", "status"])
    mig.add_argument("--steps", type=int, default=1, help="migrations to roll back (down)")
    tenant = sub.add_parser("tenant", help="manage tenants")
    tsub = tenant.add_subparsers(dest="tenant_command", required=True)
    tc = tsub.add_parser("create", help="create a tenant and print its API key id and secret")
    tc.add_argument("name")
    rooms = sub.add_parser("studyrooms", help="shared study rooms (seed 003)")
    rsub = rooms.add_subparsers(dest="studyrooms_command", required=True)
    seed = rsub.add_parser(
        "seed", help="create the tenant's 10 study rooms x 50 seats (idempotent)"
    )
    seed.add_argument("--tenant", required=True, help="tenant id")
    retention = sub.add_parser("retention", help="data retention jobs")
    rtsub = retention.add_subparsers(dest="retention_command", required=True)
    rrun = rtsub.add_parser("run", help="delete chat older than CLASSMESH_CHAT_RETENTION_DAYS")
    rrun.add_argument("--chat-days", type=int, default=None, help="override the window (days)")
    token = sub.add_parser("token", help="access tokens")
    ksub = token.add_subparsers(dest="token_command", required=True)
    mint = ksub.add_parser("mint", help="mint an access token (JWT, HS256)")
    mint.add_argument("--key-id", required=True, help="API key id (JWT kid)")
    mint.add_argument("--secret", required=True, help="API key secret")
    mint.add_argument("--tenant", required=True, help="tenant id")
    mint.add_argument("--sub", required=True, help="user id")
    mint.add_argument("--name", default="", help="display name")
    mint.add_argument(
        "--role",
        default="student",
        choices=["instructor", "assistant", "student", "guest", "admin"],
    )
    mint.add_argument("--session", default="*", help="session id, or * for any")
    mint.add_argument("--caps", default="subscribe,chat", help="comma-separated capabilities")
    mint.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    return p


def _services() -> list[str]:
    from classmesh.core.server import SERVICES

    return list(SERVICES)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config()
    except ConfigError as exc:
        print(f"classmesh: {exc}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_level)
    try:
        return _dispatch(args, cfg)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for operators; details in the JSON log
        from classmesh.core.errors import ClassMeshError, from_exception

        err = exc if isinstance(exc, ClassMeshError) else from_exception(exc)
        log.debug("command failed", exc_info=True)
        print(f"classmesh: {err.message} [{err.reason}]", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, cfg: Config) -> int:
    if args.command == "config":
        _print(json.dumps(cfg.masked(), indent=2))
        return 0
    if args.command == "token":
        return _mint(args)
    if args.command == "up":
        return _run_server(_serve(cfg, _services(), dev_token=True))
    if args.command == "serve" and args.service == "gateway":
        return _run_server(_serve_gateway(cfg))
    if args.command == "serve":
        return _run_server(_serve(cfg, [args.service], dev_token=False))
    if args.command == "migrate":
        return asyncio.run(_migrate_command(cfg, args.action, args.steps))
    if args.command == "tenant":
        return asyncio.run(_tenant_create(cfg, args.name))
    if args.command == "retention":
        return asyncio.run(_retention_run(cfg, args.chat_days))
    if args.command == "studyrooms":
        return asyncio.run(_seed_study_rooms(cfg, args.tenant))
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
