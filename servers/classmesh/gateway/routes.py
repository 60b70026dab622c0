"""Which gRPC method a grpc-web path names, what kind of call it is, and where it goes.

The table is built once from the generated service descriptors, so the gateway knows every
method's kind (unary, server streaming, or a stream browsers cannot use) without a request
ever being parsed, and answers unknown paths without a round trip.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "CallKind",
    "Route",
    "RouteTable",
    "mesh_routes",
    "parse_upstreams",
]


class CallKind(Enum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    #: Client-streaming or bidirectional: grpc-web cannot carry them.
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True, slots=True)
class Route:
    """One method: its path `/package.Service/Method`, kind and upstream `host:port`."""

    path: str
    kind: CallKind
    target: str
    #: For UNSUPPORTED methods: what to call instead (the unary + server-streaming twin).
    hint: str = ""


class RouteTable:
    """Routes by path."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes: dict[str, Route] = {r.path: r for r in routes}

    def get(self, path: str) -> Route | None:
        return self._routes.get(path)

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes.values())

    def __len__(self) -> int:
        return len(self._routes)

    @property
    def targets(self) -> set[str]:
        return {r.target for r in self._routes.values()}


#: Every bidirectional RPC has a unary + server-streaming twin browsers use instead.
TWINS: dict[str, str] = {
    "/classmesh.media.v1.MediaService/Signal": (
        "use MediaService.SendSignal (unary) and MediaService.ReceiveSignals (server stream)"
    ),
    "/classmesh.interaction.v1.InteractionService/Connect": (
        "use the unary InteractionService RPCs (SendChatMessage, RaiseHand, RespondToPoll, "
        "...) and InteractionService.Subscribe (server stream)"
    ),
}


def _unsupported_hint(path: str) -> str:
    service, method = path[1:].split("/", 1)
    name = f"{service.rsplit('.', 1)[-1]}.{method}"
    twin = TWINS.get(path, "use the service's unary and server-streaming RPCs")
    return f"{name} is a client or bidirectional stream, which grpc-web cannot carry: {twin}"


def parse_upstreams(spec: str, services: Mapping[str, str]) -> dict[str, str]:
    """`session=host:port,interaction=host:port` -> {"session": "host:port", ...}.

    Raises ValueError for an unknown service name or an entry without a target.
    """
    out: dict[str, str] = {}
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        short, sep, target = entry.partition("=")
        short, target = short.strip(), target.strip()
        if not sep or not target:
            raise ValueError(f"gateway upstream {entry!r}: expected <service>=<host:port>")
        if short not in services:
            raise ValueError(
                f"gateway upstream {entry!r}: unknown service {short!r} "
                f"(one of {', '.join(sorted(services))})"
            )
        out[short] = target
    return out


def mesh_routes(
    default_target: str,
    upstreams: Mapping[str, str] | None = None,
    services: Mapping[str, str] | None = None,
) -> RouteTable:
    """Routes of every ClassMesh service; a service goes to `upstreams[short]` if given,
    else to `default_target` (the mesh port)."""
    if services is None:
        from classmesh.core.server import SERVICES

        services = SERVICES
    upstreams = upstreams or {}
    routes: list[Route] = []
    for short, full in services.items():
        module = importlib.import_module(f"classmesh.{short}.v1.{short}_service_pb2")
        name = full.rpartition(".")[2]
        descriptor = module.DESCRIPTOR.services_by_name[name]
        target = upstreams.get(short, default_target)
        for method in descriptor.methods:
            path = f"/{full}/{method.name}"
            if method.client_streaming:
                routes.append(Route(path, CallKind.UNSUPPORTED, target, _unsupported_hint(path)))
            elif method.server_streaming:
                routes.append(Route(path, CallKind.SERVER_STREAM, target))
            else:
                routes.append(Route(path, CallKind.UNARY, target))
    return RouteTable(routes)
