"""grpc-web gateway: browsers reach the mesh over HTTP/1.1 (unary and server streaming).

`classmesh up` runs it beside the mesh (default http://127.0.0.1:8080); `classmesh serve
gateway` runs it alone in front of the services named by `CLASSMESH_GATEWAY_UPSTREAMS`.
"""

from __future__ import annotations

from classmesh.gateway.app import STATIC_DIR, Gateway, GatewaySettings, GatewayStats
from classmesh.gateway.routes import CallKind, Route, RouteTable, mesh_routes, parse_upstreams

__all__ = [
    "STATIC_DIR",
    "CallKind",
    "Gateway",
    "GatewaySettings",
    "GatewayStats",
    "Route",
    "RouteTable",
    "mesh_routes",
    "parse_upstreams",
    "start_gateway",
]


async def start_gateway(settings: GatewaySettings, routes: RouteTable, listen: str) -> Gateway:
    """Start a gateway listening on `host:port` (port 0 picks a free one)."""
    host, _, port = listen.rpartition(":")
    gateway = Gateway(settings, routes)
    await gateway.start(host.strip("[]") or "127.0.0.1", int(port))
    return gateway
