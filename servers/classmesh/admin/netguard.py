"""Where webhook deliveries may go: public addresses only (server-side request forgery).

A tenant chooses the URL our servers POST to, so without a guard a webhook could reach the
platform's own network (databases, cloud metadata at 169.254.169.254, admin ports on
loopback). Two checks, both off only with `CLASSMESH_WEBHOOK_ALLOW_PRIVATE=1`:

* **At creation** a URL whose host is an IP literal in a non-public range is refused
  (`literal_host_reason`).
* **At delivery** the host name is resolved by `GuardedResolver`, which refuses the whole
  delivery if *any* address it resolves to is non-public. aiohttp connects to exactly the
  addresses the resolver returned (and caches only those), so the connection is pinned to
  checked addresses: a DNS answer that changes between the check and the connect (DNS
  rebinding) is never used. IP-literal hosts do not go through a resolver; the dispatcher
  checks them with `literal_host_reason` before sending.

Non-public: unspecified, loopback, link-local, multicast, private, reserved and every other
range Python's `ipaddress` does not call global (e.g. 100.64.0.0/10), for IPv4 and IPv6;
IPv6 addresses that embed an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, NAT64
`64:ff9b::/96`, 6to4 `2002::/16`) are judged by the embedded address as well.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

__all__ = [
    "BlockedAddress",
    "GuardedResolver",
    "address_reason",
    "literal_host_reason",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class BlockedAddress(OSError):
    """A webhook host resolved to an address deliveries must not reach."""


def address_reason(addr: IPAddress) -> str | None:
    """Why `addr` is not a public address ("a loopback address", ...); None if it is."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:  # the socket connects to the IPv4 address
            reason = address_reason(addr.ipv4_mapped)
            return None if reason is None else f"{reason} (IPv4-mapped)"
        inner = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF) if addr in _NAT64 else addr.sixtofour
        if inner is not None and (reason := address_reason(inner)) is not None:
            return f"{reason} (embedded IPv4 {inner})"
    if addr.is_unspecified:
        return "an unspecified address"
    if addr.is_loopback:
        return "a loopback address"
    if addr.is_link_local:
        return "a link-local address"
    if addr.is_multicast:
        return "a multicast address"
    if addr.is_reserved:
        return "a reserved address"
    if addr.is_private:
        return "a private address"
    if not addr.is_global:
        return "not a globally routable address"
    return None


def literal_host_reason(host: str) -> str | None:
    """For a URL host that is an IP literal (brackets already stripped): why it may not be
    a webhook target, or None. Host names return None (they are checked at delivery)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    reason = address_reason(addr)
    return f"{host} is {reason}" if reason is not None else None


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that fails (BlockedAddress) if any address of a host is non-public,
    and otherwise returns exactly the checked addresses for the connector to use."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            try:
                addr = ipaddress.ip_address(result["host"])
            except ValueError as exc:
                raise BlockedAddress(
                    f"{host.rstrip('.')} resolves to {result['host']!r}, not an IP address"
                ) from exc
            reason = address_reason(addr)
            if reason is not None:
                raise BlockedAddress(f"{host.rstrip('.')} resolves to {addr}, {reason}")
        return results

    async def close(self) -> None:
        await self._inner.close()
