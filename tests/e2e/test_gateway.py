"""The grpc-web gateway of `classmesh up`, over real HTTP/1.1 against the real mesh.

Python (aiohttp) speaks grpc-web by hand here, so every byte of the protocol is checked:
unary, a live server stream, errors with their `google.rpc.Status` details byte-exact,
deadlines, metadata both ways, text mode, CORS, and a batch of bad requests that must each
get a clean answer while the gateway keeps serving. The last test runs the Node suite in
tests/node/ (Connect-ES `createGrpcWebTransport`) against the same gateway.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from classmesh.admin.v1 import admin_service_pb2
from classmesh.events.v1 import events_pb2
from classmesh.session.v1 import session_service_pb2 as session_pb2
from tests.conftest import ROOT
from tests.e2e.test_session_lifecycle import SessionMesh, live_class, session_mesh
from tests.support.mesh import start_mesh

ALLOWED_ORIGIN = "http://classroom.example"
GET_TENANT = "/classmesh.admin.v1.AdminService/GetTenant"
GET_SESSION = "/classmesh.session.v1.SessionService/GetSession"
JOIN_SESSION = "/classmesh.session.v1.SessionService/JoinSession"
WATCH_SESSION = "/classmesh.session.v1.SessionService/WatchSession"
BINARY = "application/grpc-web+proto"
TEXT = "application/grpc-web-text"
DOMAIN = "classmesh.dev"


# ----------------------------------------------------------------- grpc-web by hand


def frame(message: bytes, flag: int = 0) -> bytes:
    return struct.pack(">BI", flag, len(message)) + message


def parse_trailer(block: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.decode("ascii").split("\r\n"):
        if line:
            key, _, value = line.partition(":")
            out[key.strip().lower()] = value.strip()
    return out


def split_frames(data: bytes) -> tuple[list[bytes], dict[str, str] | None]:
    """Data frames and the trailer (None if there was no trailer frame)."""
    messages: list[bytes] = []
    trailer: dict[str, str] | None = None
    pos = 0
    while pos < len(data):
        flag, length = struct.unpack_from(">BI", data, pos)
        payload = data[pos + 5 : pos + 5 + length]
        assert len(payload) == length, "truncated frame in the response"
        pos += 5 + length
        if flag & 0x80:
            assert trailer is None, "two trailer frames"
            trailer = parse_trailer(payload)
        else:
            assert trailer is None, "data after the trailer frame"
            messages.append(payload)
    return messages, trailer


def b64_segments(text: bytes) -> bytes:
    """Decode base64 made of individually padded segments (grpc-web-text responses)."""
    out = bytearray()
    run = bytearray()
    for i in range(0, len(text), 4):
        run += text[i : i + 4]
        if b"=" in text[i : i + 4]:
            out += base64.b64decode(bytes(run))
            run.clear()
    if run:
        out += base64.b64decode(bytes(run))
    return bytes(out)


@dataclass
class Reply:
    """One grpc-web response as a client sees it."""

    http_status: int
    headers: dict[str, str]
    messages: list[bytes]
    trailers: dict[str, str]

    @property
    def code(self) -> int:
        return int(self.trailers["grpc-status"])

    @property
    def message(self) -> str:
        from urllib.parse import unquote

        return unquote(self.trailers.get("grpc-message", ""))

    @property
    def details_bytes(self) -> bytes:
        raw = self.trailers["grpc-status-details-bin"]
        return base64.b64decode(raw + "=" * (-len(raw) % 4))

    def status(self) -> status_pb2.Status:
        return status_pb2.Status.FromString(self.details_bytes)

    def error_info(self) -> error_details_pb2.ErrorInfo:
        infos = []
        for detail in self.status().details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                infos.append(info)
        assert len(infos) == 1, f"exactly one ErrorInfo expected, got {infos}"
        return infos[0]


async def post(
    http: aiohttp.ClientSession,
    url: str,
    path: str,
    body: bytes,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    content_type: str = BINARY,
) -> Reply:
    """POST a grpc-web request; trailers come from the trailer frame or, for a trailers-only
    response, from the HTTP headers."""
    h = {"content-type": content_type, "x-grpc-web": "1", **(headers or {})}
    if token:
        h["authorization"] = f"Bearer {token}"
    async with http.post(url + path, data=body, headers=h) as resp:
        data = await resp.read()
        hdrs = {k.lower(): v for k, v in resp.headers.items()}
    if content_type.startswith(TEXT) and data:
        data = b64_segments(data)
    messages, trailer = split_frames(data)
    if trailer is None:
        assert not messages, "data frames without a trailer frame"
        trailer = {k: v for k, v in hdrs.items() if k.startswith("grpc-") or k.startswith("x-")}
    return Reply(resp.status, hdrs, messages, trailer)


@dataclass
class LiveStream:
    """A server stream read frame by frame as the bytes arrive."""

    resp: aiohttp.ClientResponse
    text: bool = False
    messages: list[bytes] = field(default_factory=list)
    trailers: dict[str, str] | None = None
    _buf: bytearray = field(default_factory=bytearray)

    async def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = await self.resp.content.readany()
            if not chunk:
                return False
            self._buf += b64_segments(chunk) if self.text else chunk
        return True

    async def next(self) -> bytes | None:
        """The next message; None once the trailer frame arrived."""
        if not await self._fill(5):
            raise AssertionError("stream ended without a trailer frame")
        flag, length = struct.unpack_from(">BI", self._buf)
        assert await self._fill(5 + length), "stream ended inside a frame"
        payload = bytes(self._buf[5 : 5 + length])
        del self._buf[: 5 + length]
        if flag & 0x80:
            self.trailers = parse_trailer(payload)
            return None
        self.messages.append(payload)
        return payload


def watch_body(session_id: str, after_seq: int = 0) -> bytes:
    return frame(
        session_pb2.WatchSessionRequest(
            session_id=session_id, after_seq=after_seq
        ).SerializeToString()
    )


def event_of(message: bytes) -> events_pb2.Event:
    return session_pb2.WatchSessionResponse.FromString(message).event


# -------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
async def gm(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SessionMesh]:
    async with session_mesh(
        admin_database_url,
        redis_url,
        tmp_path_factory,
        "gateway",
        {
            "CLASSMESH_RATE_LIMIT_PER_MINUTE": "0",
            "CLASSMESH_GATEWAY_CORS_ORIGINS": ALLOWED_ORIGIN,
            "CLASSMESH_GATEWAY_MAX_REQUEST_BYTES": str(1024 * 1024),
        },
    ) as m:
        assert m.proc.gateway.startswith("http://127.0.0.1:"), m.proc.lines
        yield m


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# ---------------------------------------------------------------------------- tests


async def test_unary_matches_direct_grpc_and_carries_metadata_both_ways(
    gm: SessionMesh, http: aiohttp.ClientSession
) -> None:
    token = gm.token("admin-gw", "admin")
    cid = f"gw-test-{secrets.token_hex(6)}"
    reply = await post(
        http,
        gm.proc.gateway,
        GET_TENANT,
        frame(b""),
        token=token,
        headers={"x-correlation-id": cid, "x-request-id": "rq-1"},
    )
    assert reply.http_status == 200
    assert reply.headers["content-type"] == BINARY
    assert reply.code == 0, reply.trailers
    # Trailing metadata -> trailer frame; the request's x-correlation-id reached the server.
    assert reply.trailers["x-correlation-id"] == cid
    assert len(reply.messages) == 1
    via_gateway = admin_service_pb2.GetTenantResponse.FromString(reply.messages[0])
    assert via_gateway.tenant.id == gm.tenant_id
    async with grpc.aio.insecure_channel(gm.target) as ch:
        direct = await ch.unary_unary(GET_TENANT)(
            b"", metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
    assert reply.messages[0] == direct  # the same bytes: forwarded, not re-serialised


async def test_authorization_is_passed_through(
    gm: SessionMesh, http: aiohttp.ClientSession
) -> None:
    reply = await post(http, gm.proc.gateway, GET_TENANT, frame(b""))
    assert reply.http_status == 200 and not reply.messages
    assert reply.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert reply.error_info().reason == "TOKEN_MISSING"
    bad = await post(http, gm.proc.gateway, GET_TENANT, frame(b""), token="not.a.jwt")
    assert bad.code == grpc.StatusCode.UNAUTHENTICATED.value[0]


async def test_error_details_are_byte_exact(gm: SessionMesh, http: aiohttp.ClientSession) -> None:
    token = gm.token("admin-gw", "admin")
    missing = str(uuid.uuid4())
    body = session_pb2.GetSessionRequest(session_id=missing).SerializeToString()
    reply = await post(http, gm.proc.gateway, GET_SESSION, frame(body), token=token)
    # An error before any message: trailers-only (status in the HTTP headers).
    assert reply.http_status == 200 and not reply.messages
    assert reply.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert missing in reply.message
    info = reply.error_info()
    assert (info.reason, info.domain) == ("NOT_FOUND", DOMAIN)
    assert info.metadata["resourceId"] == missing
    async with grpc.aio.insecure_channel(gm.target) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ch.unary_unary(GET_SESSION)(
                body, metadata=(("authorization", f"Bearer {token}"),), timeout=10
            )
    direct = dict(caught.value.trailing_metadata() or ())["grpc-status-details-bin"]
    assert reply.details_bytes == direct


async def test_server_stream_delivers_events_live(
    gm: SessionMesh, http: aiohttp.ClientSession
) -> None:
    session, _, _ = await live_class(gm)
    token = gm.token("admin-gw", "admin")
    headers = {
        "content-type": BINARY,
        "authorization": f"Bearer {token}",
        "x-correlation-id": f"gw-watch-{secrets.token_hex(4)}",
    }
    async with http.post(
        gm.proc.gateway + WATCH_SESSION, data=watch_body(session.id), headers=headers
    ) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"] == BINARY
        stream = LiveStream(resp)
        replayed: list[str] = []
        while "session_started" not in replayed:
            msg = await asyncio.wait_for(stream.next(), 10)
            assert msg is not None, stream.trailers
            replayed.append(event_of(msg).WhichOneof("payload") or "")
        assert replayed[0] == "session_created"
        # Live: a student joins now, through the gateway too; the event arrives on the stream.
        student = f"stu-{secrets.token_hex(3)}"
        join = session_pb2.JoinSessionRequest(request_id=str(uuid.uuid4()), session_id=session.id)
        joined = await post(
            http,
            gm.proc.gateway,
            JOIN_SESSION,
            frame(join.SerializeToString()),
            token=gm.token(student, "student"),
        )
        assert joined.code == 0, joined.trailers
        started = time.monotonic()
        while True:
            msg = await asyncio.wait_for(stream.next(), 10)
            assert msg is not None, stream.trailers
            event = event_of(msg)
            if event.WhichOneof("payload") == "participant_joined":
                assert event.participant_joined.participant.user_id == student
                break
        assert time.monotonic() - started < 10
        seqs = [event_of(m).seq for m in stream.messages]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


async def test_stream_deadline_ends_with_deadline_exceeded(
    gm: SessionMesh, http: aiohttp.ClientSession
) -> None:
    session, _, _ = await live_class(gm)
    headers = {
        "content-type": BINARY,
        "authorization": f"Bearer {gm.token('admin-gw', 'admin')}",
        "grpc-timeout": "700m",
    }
    started = time.monotonic()
    async with http.post(
        gm.proc.gateway + WATCH_SESSION, data=watch_body(session.id), headers=headers
    ) as resp:
        stream = LiveStream(resp)
        while await asyncio.wait_for(stream.next(), 15) is not None:
            pass
    assert stream.messages, "the replay comes before the deadline"
    assert stream.trailers is not None
    assert stream.trailers["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert time.monotonic() - started < 10
    raw = stream.trailers["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    assert status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


async def test_text_mode_unary_and_stream(gm: SessionMesh, http: aiohttp.ClientSession) -> None:
    token = gm.token("admin-gw", "admin")
    # Padding in the middle: the frame header and the message encoded separately.
    body = base64.b64encode(frame(b"")[:5])
    reply = await post(http, gm.proc.gateway, GET_TENANT, body, token=token, content_type=TEXT)
    assert reply.http_status == 200 and reply.code == 0, reply.trailers
    assert reply.headers["content-type"].startswith("application/grpc-web-text")
    assert admin_service_pb2.GetTenantResponse.FromString(reply.messages[0]).tenant.id
    session, _, _ = await live_class(gm)
    raw = watch_body(session.id)
    split = base64.b64encode(raw[:7]) + base64.b64encode(raw[7:])
    assert b"=" in split[:12]  # 7 bytes -> 12 characters, the last one padding
    headers = {"content-type": TEXT, "authorization": f"Bearer {token}", "grpc-timeout": "2S"}
    async with http.post(gm.proc.gateway + WATCH_SESSION, data=split, headers=headers) as resp:
        stream = LiveStream(resp, text=True)
        while await asyncio.wait_for(stream.next(), 15) is not None:
            pass
    kinds = [event_of(m).WhichOneof("payload") for m in stream.messages]
    assert kinds[:2] == ["session_created", "session_started"], kinds
    assert stream.trailers is not None and stream.trailers["grpc-status"] == "4"


async def test_cors_allow_list(gm: SessionMesh, http: aiohttp.ClientSession) -> None:
    url = gm.proc.gateway
    token = gm.token("admin-gw", "admin")
    ok = await post(
        http, url, GET_TENANT, frame(b""), token=token, headers={"origin": ALLOWED_ORIGIN}
    )
    assert ok.code == 0
    assert ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    exposed = {h.strip() for h in ok.headers["access-control-expose-headers"].split(",")}
    assert {"grpc-status", "grpc-message", "grpc-status-details-bin"} <= exposed
    preflight_headers = {
        "origin": ALLOWED_ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,x-grpc-web,authorization,grpc-timeout",
    }
    async with http.options(url + GET_TENANT, headers=preflight_headers) as resp:
        assert resp.status == 204
        assert resp.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert "POST" in resp.headers["access-control-allow-methods"]
        allowed = resp.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "grpc-timeout" in allowed
    evil = {**preflight_headers, "origin": "http://evil.example"}
    async with http.options(url + GET_TENANT, headers=evil) as resp:
        assert resp.status == 403
        assert "access-control-allow-origin" not in {k.lower() for k in resp.headers}
    # Same-origin pages (served by the gateway) need no allow-list entry.
    same = await post(http, url, GET_TENANT, frame(b""), token=token, headers={"origin": url})
    assert same.code == 0
    assert "access-control-allow-origin" not in same.headers


async def test_bad_requests_get_clean_errors_and_the_gateway_keeps_serving(
    gm: SessionMesh, http: aiohttp.ClientSession
) -> None:
    url = gm.proc.gateway
    token = gm.token("admin-gw", "admin")
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    unimplemented = grpc.StatusCode.UNIMPLEMENTED.value[0]
    cases: list[tuple[str, str, bytes, dict[str, str], int, int, str]] = [
        # name, path, body, headers, HTTP status, grpc-status, text in grpc-message
        ("bad flag", GET_TENANT, b"\x42\0\0\0\0", {}, 400, invalid, "flag"),
        ("truncated", GET_TENANT, b"\0\0\0\0\x64" + b"x" * 10, {}, 400, invalid, "truncated"),
        ("short header", GET_TENANT, b"\0\0", {}, 400, invalid, "5-byte"),
        ("empty body", GET_TENANT, b"", {}, 400, invalid, "5-byte"),
        ("two frames", GET_TENANT, frame(b"") + frame(b""), {}, 400, invalid, "exactly one"),
        ("compressed", GET_TENANT, b"\x01\0\0\0\0", {}, 400, invalid, "compressed"),
        ("oversized", GET_TENANT, frame(b"x" * (1024 * 1024 + 1)), {}, 413, 8, "larger than"),
        (
            "unknown method",
            "/classmesh.nope.v1.Nope/Nope",
            frame(b""),
            {},
            200,
            unimplemented,
            "unknown method",
        ),
        (
            "unknown rpc",
            "/classmesh.session.v1.SessionService/Nope",
            frame(b""),
            {},
            200,
            unimplemented,
            "unknown method",
        ),
        (
            "bidi Connect",
            "/classmesh.interaction.v1.InteractionService/Connect",
            frame(b""),
            {},
            200,
            unimplemented,
            "InteractionService.Subscribe",
        ),
        (
            "bidi Signal",
            "/classmesh.media.v1.MediaService/Signal",
            frame(b""),
            {},
            200,
            unimplemented,
            "SendSignal",
        ),
        (
            "bad content-type",
            GET_TENANT,
            frame(b""),
            {"content-type": "application/json"},
            415,
            invalid,
            "content-type",
        ),
        (
            "json grpc-web",
            GET_TENANT,
            b"{}",
            {"content-type": "application/grpc-web+json"},
            415,
            invalid,
            "JSON",
        ),
        (
            "bad origin",
            GET_TENANT,
            frame(b""),
            {"origin": "http://evil.example"},
            403,
            7,
            "not allowed",
        ),
        ("bad base64", GET_TENANT, b"!!!notbase64", {"content-type": TEXT}, 400, invalid, "base64"),
        (
            "bad timeout",
            GET_TENANT,
            frame(b""),
            {"grpc-timeout": "soon"},
            400,
            invalid,
            "grpc-timeout",
        ),
        (
            "bad binary header",
            GET_TENANT,
            frame(b""),
            {"x-trace-bin": "%%%"},
            400,
            invalid,
            "x-trace-bin",
        ),
    ]
    for name, path, body, extra, http_status, code, text in cases:
        headers = {"authorization": f"Bearer {token}", **extra}
        ctype = headers.pop("content-type", BINARY)
        reply = await post(http, url, path, body, headers=headers, content_type=ctype)
        assert (reply.http_status, reply.code) == (http_status, code), (name, reply)
        assert text in reply.message, (name, reply.message)
        assert reply.error_info().domain == DOMAIN, name
        assert not reply.messages, name
    # A well-framed message that is not protobuf is forwarded as is; the server refuses it.
    garbage = await post(http, url, GET_SESSION, frame(b"\xff\xff\xff"), token=token)
    assert garbage.http_status == 200 and garbage.code != 0 and not garbage.messages
    # A GET of an RPC path is not an RPC; a path outside the static files is a plain 404.
    async with http.get(url + GET_TENANT) as resp:
        assert resp.status == 404
    async with http.get(url + "/../../etc/passwd") as resp:
        assert resp.status == 404
    async with http.get(url + "/healthz") as resp:
        assert resp.status == 200
        assert (await resp.text()).startswith("ok")
    good = await post(http, url, GET_TENANT, frame(b""), token=token)
    assert good.code == 0 and len(good.messages) == 1


async def test_serve_gateway_alone_routes_each_service_to_its_upstream(
    gm: SessionMesh, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """`classmesh serve gateway`: AdminService goes to the mesh (CLASSMESH_GATEWAY_UPSTREAMS),
    every other service to CLASSMESH_PEER_TARGET, here a port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    proc = start_mesh(
        {
            "CLASSMESH_GATEWAY_UPSTREAMS": f"admin={gm.target}",
            "CLASSMESH_PEER_TARGET": dead,
        },
        str(tmp_path / "gateway.stderr"),
        "serve",
        "gateway",
    )
    try:
        await asyncio.to_thread(proc.wait_ready, 30)
        assert proc.gateway.startswith("http://127.0.0.1:") and "ready: gateway" in proc.lines
        token = gm.token("admin-gw", "admin")
        ok = await post(http, proc.gateway, GET_TENANT, frame(b""), token=token)
        assert ok.code == 0 and len(ok.messages) == 1, ok
        body = session_pb2.GetSessionRequest(session_id=str(uuid.uuid4())).SerializeToString()
        down = await post(http, proc.gateway, GET_SESSION, frame(body), token=token)
        assert down.http_status == 200
        assert down.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert down.error_info().reason == "UNAVAILABLE"
        async with http.get(proc.gateway + "/healthz") as resp:
            text = await resp.text()
        assert gm.target in text and dead in text
        assert await asyncio.to_thread(proc.terminate, 10.0) == 0
    finally:
        proc.kill()


def test_serve_gateway_refuses_a_busy_port_and_an_unknown_upstream() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSMESH_")}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = [
            ({"CLASSMESH_GATEWAY_LISTEN": f"127.0.0.1:{busy.getsockname()[1]}"}, "in use"),
            (
                {"CLASSMESH_GATEWAY_LISTEN": "127.0.0.1:0", "CLASSMESH_GATEWAY_UPSTREAMS": "x=h:1"},
                "unknown service 'x'",
            ),
        ]
        for extra, text in cases:
            proc = subprocess.run(
                [sys.executable, "-m", "classmesh.cli", "serve", "gateway"],
                env={**env, **extra},
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 2, proc.stderr
            assert text in proc.stderr and "CLASSMESH_GATEWAY_LISTEN" in proc.stderr


def _node_available() -> str:
    node = shutil.which("node")
    assert node, "Node.js is required (README: make test needs Node.js)"
    return node


async def test_connect_es_node_suite(gm: SessionMesh) -> None:
    """tests/node/*.test.mjs: Connect-ES createGrpcWebTransport against this gateway."""
    node = _node_available()
    session, teacher, _ = await live_class(gm)
    env = {
        **os.environ,
        "CLASSMESH_GATEWAY_URL": gm.proc.gateway,
        "CLASSMESH_ADMIN_TOKEN": gm.token("admin-node", "admin"),
        "CLASSMESH_STUDENT_TOKEN": gm.token(f"stu-node-{secrets.token_hex(3)}", "student"),
        "CLASSMESH_SESSION_ID": session.id,
        "CLASSMESH_TENANT_ID": gm.tenant_id,
    }
    proc = await asyncio.to_thread(
        subprocess.run,
        [
            node,
            "--disable-warning=MODULE_TYPELESS_PACKAGE_JSON",
            "--test",
            "--test-force-exit",
            "--test-reporter=spec",
            "tests/node/",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for name in ("unary", "server stream", "error details", "deadline", "metadata", "text mode"):
        assert name in out, f"the Node suite must cover {name!r}:\n{out}"
    passed = re.search(r"^\S* ?pass (\d+)$", out, re.M)
    assert passed and int(passed.group(1)) >= 8, out
    assert re.search(r"^\S* ?fail 0$", out, re.M), out
