"""Mesh assembly: interceptors, servicers, health, reflection, graceful stop.

`classmesh up` registers every service on one gRPC port; `classmesh serve <name>` registers
one. A service whose implementation module (`classmesh.<name>.servicer`) is not present is
registered with its generated base servicer, which answers `UNIMPLEMENTED` for every RPC
(listed as such in the README status table).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from classmesh.core.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    RateLimitInterceptor,
    TelemetryInterceptor,
)
from classmesh.core.runtime import Runtime

__all__ = ["SERVICES", "MeshServer", "start_server", "wait_for_shutdown"]

log = logging.getLogger("classmesh.server")

#: short name -> fully qualified gRPC service name. The proto package is
#: `classmesh.<short>.v1` and the generated module `<short>_service_pb2_grpc`.
SERVICES: dict[str, str] = {
    "session": "classmesh.session.v1.SessionService",
    "media": "classmesh.media.v1.MediaService",
    "breakout": "classmesh.breakout.v1.BreakoutService",
    "interaction": "classmesh.interaction.v1.InteractionService",
    "recording": "classmesh.recording.v1.RecordingService",
    "admin": "classmesh.admin.v1.AdminService",
}

#: Methods callable without a bearer token (a token that is sent is still verified); the
#: handler requires one unless the request does not need it (a guest join through a link).
TOKEN_OPTIONAL_METHODS: tuple[str, ...] = ("/classmesh.session.v1.SessionService/JoinSession",)

#: Keepalive and message limits (explicit, per STYLE rule 11).
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]


def generated_module(short: str) -> ModuleType:
    return importlib.import_module(f"classmesh.{short}.v1.{short}_service_pb2_grpc")


def _implementation(short: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"classmesh.{short}.servicer")
    except ModuleNotFoundError as exc:
        if exc.name == f"classmesh.{short}.servicer":
            return None
        raise


def add_service(server: grpc.aio.Server, runtime: Runtime, short: str) -> bool:
    """Register one service; returns True when it has an implementation."""
    gen = generated_module(short)
    service = SERVICES[short].rsplit(".", 1)[1]
    add: Callable[[object, grpc.aio.Server], None] = getattr(
        gen, f"add_{service}Servicer_to_server"
    )
    impl = _implementation(short)
    if impl is not None:
        add(impl.create_servicer(runtime), server)
        return True
    base: type = getattr(gen, f"{service}Servicer")
    add(base(), server)
    return False


@dataclass
class MeshServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    services: list[str]

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.services]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)


async def start_server(runtime: Runtime, shorts: Sequence[str], listen: str) -> MeshServer:
    cfg = runtime.config
    interceptors = [
        TelemetryInterceptor(),
        ErrorInterceptor(),
        AuthInterceptor(runtime.keys, token_optional_methods=TOKEN_OPTIONAL_METHODS),
        RateLimitInterceptor(runtime.limiter, cfg.rate_limit_per_minute, cfg.rate_limit_burst),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    names: list[str] = []
    for short in shorts:
        implemented = add_service(server, runtime, short)
        names.append(SERVICES[short])
        log.info(
            "service registered", extra={"service": SERVICES[short], "implemented": implemented}
        )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    host = listen.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    runtime.bound_target = f"{host}:{port}"
    await server.start()
    mesh = MeshServer(server=server, health=health_servicer, port=port, services=names)
    await mesh.set_serving(True)
    return mesh


async def wait_for_shutdown() -> str:
    """Block until SIGINT or SIGTERM; returns the signal's name."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()

    def stop(sig: signal.Signals) -> None:
        if not fut.done():
            fut.set_result(sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await fut
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
