"""The webhook guard against server-side request forgery, on a mesh with
CLASSMESH_WEBHOOK_ALLOW_PRIVATE off (the default): non-public IP literals are refused at
creation, and a delivery to a host name resolving to loopback fails without a request."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from classmesh.admin.netguard import BlockedAddress, GuardedResolver, literal_host_reason
from classmesh.core.config import ConfigError, load_config
from classmesh_sdk import InvalidArgumentError
from tests.support.classroom import Mesh, classroom_mesh, live_class

GUARD_ENV = {
    "CLASSMESH_WEBHOOK_POLL_INTERVAL_SECONDS": "0.1",
    "CLASSMESH_WEBHOOK_BACKOFF_BASE_SECONDS": "0.05",
    "CLASSMESH_WEBHOOK_BACKOFF_MAX_SECONDS": "0.2",
    "CLASSMESH_WEBHOOK_MAX_ATTEMPTS": "2",
    "CLASSMESH_WEBHOOK_TIMEOUT_SECONDS": "3",
    "CLASSMESH_WEBHOOK_ALLOW_PRIVATE": "0",
}
DEADLINE = 20.0


@pytest.fixture(scope="module")
async def mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with classroom_mesh(
        admin_database_url, redis_url, tmp_path_factory, "webhook-guard", GUARD_ENV
    ) as m:
        yield m


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A loopback HTTP endpoint that records every request it gets."""
    hits: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port, hits
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://10.1.2.3/hook", "private"),
        ("https://192.168.1.10/hook", "private"),
        ("https://172.16.0.5:8443/hook", "private"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
        ("http://127.0.0.1:9/hook", "loopback"),
        ("https://[::1]/hook", "loopback"),
        ("https://[fd00::1]/hook", "private"),
        ("https://[fe80::1]/hook", "link-local"),
        ("https://[::ffff:127.0.0.1]/hook", "loopback"),
        ("https://[::ffff:10.0.0.1]/hook", "private"),
        ("https://0.0.0.0/hook", "unspecified"),
        ("https://224.0.0.1/hook", "multicast"),
        ("https://100.64.0.1/hook", "not a globally routable"),
    ],
)
async def test_non_public_ip_literals_are_refused_at_creation(
    mesh: Mesh, url: str, why: str
) -> None:
    admin = mesh.client("guard-admin", "admin")
    with pytest.raises(InvalidArgumentError) as info:
        await admin.admin.create_webhook(request_id=str(uuid.uuid4()), url=url)
    assert info.value.reason == "VALIDATION_FAILED"
    messages = dict(info.value.field_violations)
    assert "public address" in messages["url"] and why in messages["url"], messages


async def test_public_addresses_and_host_names_are_accepted(mesh: Mesh) -> None:
    admin = mesh.client("guard-admin", "admin")
    made = [
        (await admin.admin.create_webhook(request_id=str(uuid.uuid4()), url=url)).webhook.id
        for url in ("https://93.184.215.14/hook", "https://[2606:4700::1]/h", "https://x.example/")
    ]
    for webhook_id in made:
        await admin.admin.delete_webhook(webhook_id=webhook_id)


async def _wait_dead(mesh: Mesh, webhook_id: str, session_id: str) -> dict[str, object]:
    end = time.monotonic() + DEADLINE
    while True:
        row = await mesh.pool.fetchrow(
            "SELECT state::text AS state, attempts, response_status, last_error "
            "FROM webhook_deliveries WHERE webhook_id = $1 AND event_key LIKE $2",
            uuid.UUID(webhook_id),
            session_id + ":%",
        )
        if row is not None and row["state"] == "dead":
            return dict(row)
        assert time.monotonic() < end, f"not dead within {DEADLINE} s: {row}"
        await asyncio.sleep(0.05)


async def test_a_host_name_resolving_to_loopback_is_refused_at_delivery(
    mesh: Mesh, receiver: tuple[int, list[bytes]]
) -> None:
    port, hits = receiver
    admin = mesh.client("guard-admin", "admin")
    # A host name passes creation (it is resolved only when delivering).
    created = await admin.admin.create_webhook(
        request_id=str(uuid.uuid4()),
        url=f"http://localhost:{port}/named",
        event_types=["session_started"],
    )
    klass = await live_class(mesh)
    row = await _wait_dead(mesh, created.webhook.id, klass.id)
    assert row["attempts"] == 2 and row["response_status"] is None
    error = str(row["last_error"])
    assert error.startswith("refused: localhost resolves to "), error
    assert "loopback address" in error, error
    assert hits == [], "nothing reached the receiver"
    await admin.admin.delete_webhook(webhook_id=created.webhook.id)


async def test_an_ip_literal_stored_earlier_is_refused_at_delivery(
    mesh: Mesh, receiver: tuple[int, list[bytes]]
) -> None:
    """A URL accepted while the flag was on (here: written to the table) is still checked
    when sending once the flag is off."""
    port, hits = receiver
    admin = mesh.client("guard-admin", "admin")
    created = await admin.admin.create_webhook(
        request_id=str(uuid.uuid4()), url="https://x.example/", event_types=["session_started"]
    )
    await mesh.pool.execute(
        "UPDATE webhooks SET url = $2 WHERE id = $1",
        uuid.UUID(created.webhook.id),
        f"http://127.0.0.1:{port}/literal",
    )
    klass = await live_class(mesh)
    row = await _wait_dead(mesh, created.webhook.id, klass.id)
    assert str(row["last_error"]).startswith("refused: 127.0.0.1 is a loopback address")
    assert hits == []
    await admin.admin.delete_webhook(webhook_id=created.webhook.id)


# ------------------------------------------------------------ the guard's parts, no mesh


class _Answers(AbstractResolver):
    """A DNS answer chosen by the test (stands in for the system resolver)."""

    def __init__(self, *hosts: str) -> None:
        self.hosts = hosts
        self.calls = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls += 1
        return [
            {
                "hostname": host,
                "host": h,
                "port": port,
                "family": socket.AF_INET6 if ":" in h else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for h in self.hosts
        ]

    async def close(self) -> None:
        return None


async def test_the_resolver_refuses_a_name_if_any_address_is_not_public() -> None:
    ok = GuardedResolver(_Answers("93.184.215.14", "2606:4700::1"))
    assert [r["host"] for r in await ok.resolve("hooks.example", 443)] == [
        "93.184.215.14",
        "2606:4700::1",
    ]
    for answer in (("93.184.215.14", "10.0.0.7"), ("::ffff:169.254.169.254",), ("fd12::5",)):
        with pytest.raises(BlockedAddress) as info:
            await GuardedResolver(_Answers(*answer)).resolve("hooks.example", 443)
        assert str(info.value).startswith("hooks.example resolves to ")


async def test_a_connection_goes_only_to_the_checked_addresses() -> None:
    """The check is the connector's own (single) lookup, not a separate one before it: the
    name is resolved once, by the guarded resolver, and an answer pointing at loopback is
    refused before any connection, so nothing reaches the port."""
    hits: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    answers = _Answers("127.0.0.1")
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(answers), use_dns_cache=False)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            with pytest.raises(aiohttp.ClientConnectorError) as info:
                await http.post(f"http://rebind.example:{port}/x", data=b"{}")
            assert isinstance(info.value.os_error, BlockedAddress)
        assert answers.calls == 1 and hits == []
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("64:ff9b::a9fe:a9fe", "link-local address (embedded IPv4 169.254.169.254)"),
        ("2002:c0a8:0101::1", "private address (embedded IPv4 192.168.1.1)"),
        ("::", "unspecified"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("93.184.215.14", None),
        ("::ffff:93.184.215.14", None),
        ("hooks.example", None),
    ],
)
def test_literal_host_reasons(host: str, reason: str | None) -> None:
    got = literal_host_reason(host)
    assert got is None if reason is None else (got is not None and reason in got), got


def test_the_flag_is_off_by_default_and_parsed_strictly() -> None:
    assert load_config({}).webhook_allow_private is False
    assert load_config({"CLASSMESH_WEBHOOK_ALLOW_PRIVATE": "1"}).webhook_allow_private is True
    assert load_config({"CLASSMESH_WEBHOOK_ALLOW_PRIVATE": "false"}).webhook_allow_private is False
    with pytest.raises(ConfigError):
        load_config({"CLASSMESH_WEBHOOK_ALLOW_PRIVATE": "maybe"})
