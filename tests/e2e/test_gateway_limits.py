"""The gateway's limits with a real upstream gRPC server whose streams we control.

An in-process `grpc.aio` server streams exactly what a test asks for (a flood of large
messages, one message then silence, nothing at all); the gateway in front of it is the
real `Gateway` on a real port, reached over real HTTP/1.1 (aiohttp, or a raw socket for a
client that stops reading). Checked here: a client that cannot keep up is cut with
RESOURCE_EXHAUSTED while upstream is held back (not buffered), idle streams end with
UNAVAILABLE, a client that goes away cancels the upstream call, shutdown ends open
streams cleanly, and the static files are served without directory traversal.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from classmesh.gateway import CallKind, Gateway, GatewaySettings, Route, RouteTable
from tests.e2e.test_gateway import BINARY, LiveStream, frame, post

FLOOD = "/test.Feed/Flood"
TRICKLE = "/test.Feed/Trickle"
QUIET = "/test.Feed/Quiet"
ECHO = "/test.Feed/Echo"


@dataclass
class Upstream:
    """A gRPC server with test streams; records what it sent and which calls ended how."""

    server: grpc.aio.Server
    target: str
    sent: dict[str, int] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    request_metadata: list[dict[str, str | bytes]] = field(default_factory=list)

    def handler(self) -> grpc.GenericRpcHandler:
        up = self

        async def flood(request: bytes, context: Any) -> AsyncIterator[bytes]:
            count, size = struct.unpack(">II", request)
            tag = f"flood-{id(context)}"
            up.sent[tag] = 0
            payload = b"x" * size
            done = False
            try:
                for _ in range(count):
                    yield payload
                    up.sent[tag] += 1
                done = True
                up.finished.append(tag)
            finally:
                if not done:  # cancelled, or the generator closed by a failed write
                    up.cancelled.append(tag)

        async def trickle(request: bytes, context: Any) -> AsyncIterator[bytes]:
            try:
                yield b"first"
                await asyncio.sleep(3600)
            finally:
                up.cancelled.append("trickle")

        async def quiet(request: bytes, context: Any) -> AsyncIterator[bytes]:
            try:
                await asyncio.sleep(3600)
                yield b""
            finally:
                up.cancelled.append("quiet")

        async def echo(request: bytes, context: Any) -> bytes:
            got = dict(context.invocation_metadata() or ())
            up.request_metadata.append(got)
            await context.send_initial_metadata((("x-upstream", "yes"), ("x-blob-bin", b"\0\1")))
            context.set_trailing_metadata((("x-trail", "t1"), ("x-raw-bin", b"\xff\xfe")))
            return request

        handlers = {
            FLOOD: grpc.unary_stream_rpc_method_handler(flood),
            TRICKLE: grpc.unary_stream_rpc_method_handler(trickle),
            QUIET: grpc.unary_stream_rpc_method_handler(quiet),
            ECHO: grpc.unary_unary_rpc_method_handler(echo),
        }

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> Any:
                return handlers.get(details.method)  # type: ignore[attr-defined]

        return Handler()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    up = Upstream(server=server, target=f"127.0.0.1:{port}")
    server.add_generic_rpc_handlers((up.handler(),))
    await server.start()
    yield up
    await server.stop(0)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(upstream: Upstream) -> AsyncIterator[GatewayFactory]:
    started: list[Gateway] = []

    async def make(**settings: Any) -> Gateway:
        routes = RouteTable(
            [
                Route(FLOOD, CallKind.SERVER_STREAM, upstream.target),
                Route(TRICKLE, CallKind.SERVER_STREAM, upstream.target),
                Route(QUIET, CallKind.SERVER_STREAM, upstream.target),
                Route(ECHO, CallKind.UNARY, upstream.target),
            ]
        )
        gw = Gateway(GatewaySettings(**settings), routes)
        await gw.start("127.0.0.1", 0)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        await gw.stop()


async def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.05)


def raw_request(port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {BINARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_a_client_that_stops_reading_is_cut_and_upstream_is_held_back(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(slow_client_seconds=1.0, stream_buffer_bytes=64 * 1024)
    count, size = 4000, 64 * 1024  # 256 MiB if anything buffered it all
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024 * 1024)
    try:
        writer.write(raw_request(gw.port, FLOOD, frame(struct.pack(">II", count, size))))
        await writer.drain()
        # Read nothing: the gateway must stop pulling from upstream and cut us.
        await wait_until(lambda: gw.stats.slow_cut == 1, timeout=20)
        await wait_until(lambda: len(upstream.cancelled) == 1, timeout=10)
        sent = sum(upstream.sent.values())
        assert sent < count // 4, f"upstream was not held back: {sent} of {count} sent"
        assert not upstream.finished
        # Whatever was in flight is still delivered, then the status: RESOURCE_EXHAUSTED.
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert b"grpc-status: 8\r\n" in data
    assert b"did not read the stream" in data
    assert gw.stats.streams_open == 0


async def test_a_fast_client_gets_the_whole_flood(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(slow_client_seconds=2.0, stream_buffer_bytes=64 * 1024)
    count, size = 300, 16 * 1024
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gw.url + FLOOD,
            data=frame(struct.pack(">II", count, size)),
            headers={"content-type": BINARY},
        ) as resp:
            stream = LiveStream(resp)
            while await asyncio.wait_for(stream.next(), 10) is not None:
                pass
    assert len(stream.messages) == count
    assert all(len(m) == size for m in stream.messages)
    assert stream.trailers == {"grpc-status": "0"}
    assert gw.stats.slow_cut == 0


async def test_idle_streams_end_with_unavailable(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(stream_idle_seconds=1.0)
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        # Nothing ever arrives: a trailers-only UNAVAILABLE.
        quiet = await post(http, gw.url, QUIET, frame(b""))
        assert quiet.http_status == 200 and not quiet.messages
        assert quiet.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "no message for 1 s" in quiet.message
        assert quiet.error_info().reason == "UNAVAILABLE"
        assert time.monotonic() - started < 6
        # One message, then silence: the trailer frame ends the stream, details included.
        async with http.post(
            gw.url + TRICKLE, data=frame(b""), headers={"content-type": BINARY}
        ) as resp:
            stream = LiveStream(resp)
            assert await asyncio.wait_for(stream.next(), 5) == b"first"
            assert await asyncio.wait_for(stream.next(), 6) is None
        assert stream.trailers is not None
        assert stream.trailers["grpc-status"] == "14"
        assert stream.trailers["grpc-status-details-bin"]
    assert gw.stats.idle_closed == 2
    await wait_until(lambda: sorted(upstream.cancelled) == ["quiet", "trickle"])


async def test_a_client_that_goes_away_cancels_the_upstream_call(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(stream_idle_seconds=60.0)
    for path, tag in ((QUIET, "quiet"), (TRICKLE, "trickle")):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(raw_request(gw.port, path, frame(b"")))
        await writer.drain()
        await wait_until(lambda: gw.stats.streams_open == 1)
        if path == TRICKLE:
            assert b"first" in await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        await wait_until(lambda t=tag: t in upstream.cancelled, timeout=10)
        await wait_until(lambda: gw.stats.streams_open == 0)
    # Still serving.
    async with aiohttp.ClientSession() as http:
        echo = await post(http, gw.url, ECHO, frame(b"ping"))
    assert echo.messages == [b"ping"] and echo.code == 0


async def test_shutdown_ends_open_streams_cleanly(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(stream_idle_seconds=60.0)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gw.url + TRICKLE, data=frame(b""), headers={"content-type": BINARY}
        ) as resp:
            stream = LiveStream(resp)
            assert await asyncio.wait_for(stream.next(), 5) == b"first"
            stopping = asyncio.create_task(gw.stop())
            assert await asyncio.wait_for(stream.next(), 5) is None
            await asyncio.wait_for(stopping, 10)
    assert stream.trailers is not None and stream.trailers["grpc-status"] == "14"
    assert "shutting down" in stream.trailers["grpc-message"]


async def test_static_files_without_traversal(
    upstream: Upstream, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    static = tmp_path / "static"
    (static / "js").mkdir(parents=True)
    (static / "index.html").write_text("<!doctype html><title>class</title>")
    (static / "js" / "app.js").write_text("export const x = 1;")
    (static / "style.css").write_text("body{}")
    (static / ".env").write_text("SECRET=1")
    (tmp_path / "outside.txt").write_text("outside")
    (static / "link.txt").symlink_to(tmp_path / "outside.txt")
    gw = await make_gateway(static_dir=static)
    async with aiohttp.ClientSession() as http:
        for path, ctype, body in (
            ("/", "text/html", "<!doctype html>"),
            ("/index.html", "text/html", "<!doctype html>"),
            ("/js/app.js", "text/javascript", "export const"),
            ("/style.css", "text/css", "body"),
        ):
            async with http.get(gw.url + path) as resp:
                assert resp.status == 200, path
                assert resp.headers["content-type"].startswith(ctype), path
                assert resp.headers["x-content-type-options"] == "nosniff"
                assert (await resp.text()).startswith(body), path
        for path in (
            "/.env",
            "/link.txt",
            "/js/../../outside.txt",
            "/%2e%2e/outside.txt",
            "/js/%2e%2e/%2e%2e/outside.txt",
            "/..%2foutside.txt",
            "/missing.js",
            "/js/",
        ):
            async with http.get(gw.url + path) as resp:
                assert resp.status == 404, path
                assert "outside" not in await resp.text(), path
        async with http.get(gw.url + "/healthz") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert text.startswith("ok") and upstream.target in text
        async with http.delete(gw.url + ECHO) as resp:
            assert resp.status == 405


async def test_metadata_both_ways_with_binary_values(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway()
    headers = {
        "x-custom": "abc",
        "x-trace-bin": base64.b64encode(b"\0\xff").decode().rstrip("="),
        "authorization": "Bearer t0k",
        "cookie": "session=secret",
        "x-user-agent": "grpc-web-javascript/0.1",
        "grpc-timeout": "5S",
    }
    async with aiohttp.ClientSession() as http:
        reply = await post(http, gw.url, ECHO, frame(b"hi"), headers=headers)
    assert reply.code == 0 and reply.messages == [b"hi"]
    got = upstream.request_metadata[-1]
    assert got["x-custom"] == "abc"
    assert got["x-trace-bin"] == b"\0\xff"
    assert got["authorization"] == "Bearer t0k"
    assert "cookie" not in got and "x-user-agent" not in got and "x-grpc-web" not in got
    # Initial metadata -> HTTP headers, trailing metadata -> trailer frame (-bin as base64).
    assert reply.headers["x-upstream"] == "yes"
    assert base64.b64decode(reply.headers["x-blob-bin"]) == b"\0\1"
    assert reply.trailers["x-trail"] == "t1"
    assert base64.b64decode(reply.trailers["x-raw-bin"]) == b"\xff\xfe"


def test_wire_helpers() -> None:
    from classmesh.gateway.protocol import (
        FrameError,
        content_format,
        decode_request_body,
        encode_grpc_message,
        parse_grpc_timeout,
    )

    assert parse_grpc_timeout("1H") == 3600
    assert parse_grpc_timeout("250m") == pytest.approx(0.25)
    assert parse_grpc_timeout("99999999n") == pytest.approx(0.099999999)
    for bad in ("", "S", "1s", "123456789S", "-1S", "1.5S"):
        with pytest.raises(FrameError):
            parse_grpc_timeout(bad)
    assert encode_grpc_message("plain message") == "plain message"
    assert encode_grpc_message("café 100%\n") == "caf%C3%A9 100%25%0A"
    text = content_format("application/grpc-web-text; charset=utf-8")
    assert text is not None and text.text
    assert content_format("application/grpc-web+json") is None
    # Several frames' worth of base64, each padded: decoded as one body.
    body = frame(b"\x08\x01")
    segments = base64.b64encode(body[:1]) + base64.b64encode(body[1:4]) + base64.b64encode(body[4:])
    assert decode_request_body(segments, text) == b"\x08\x01"
