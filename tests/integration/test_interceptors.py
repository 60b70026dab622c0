"""Interceptor chain through a real grpc.aio server: error mapping, telemetry, rate limits."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
import redis.asyncio as aioredis
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from classmesh.core.auth import AccessToken, KeyStore, current_principal, require
from classmesh.core.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Validator,
)
from classmesh.core.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    RateLimitInterceptor,
    TelemetryInterceptor,
)
from classmesh.core.ratelimit import RateLimiter

SERVICE = "classmesh.test.v1.ProbeService"
SECRET_TEXT = "SELECT secret_column FROM hidden_table"
Ctx = grpc.aio.ServicerContext[Any, Any]


def _raw(data: bytes) -> bytes:
    # Messages are raw bytes: the probe service has no protobuf schema.
    return data


ERRORS: dict[str, Callable[[], Exception]] = {
    "invalid": lambda: InvalidArgument([("title", "is required")]),
    "not_found": lambda: NotFound("session", "s-1"),
    "precondition": lambda: FailedPrecondition("SESSION_ENDED", "the session has ended"),
    "exists": lambda: AlreadyExists("ALREADY_EXISTS", "exists"),
    "aborted": lambda: Aborted("CONCURRENT_MODIFICATION"),
    "denied": lambda: PermissionDenied("PERMISSION_MISSING", "no"),
    "unauthenticated": lambda: Unauthenticated("TOKEN_EXPIRED", "expired"),
    "exhausted": lambda: ResourceExhausted("SESSION_FULL", 3.0, "full"),
    "unavailable": lambda: Unavailable("BACKEND_UNAVAILABLE", 1.0),
    "deadline": lambda: DeadlineExceeded(),
    "timeout": lambda: TimeoutError(),
}


@dataclass(frozen=True)
class Key:
    key_id: str
    tenant_id: str
    secret: str

    def token(self, sub: str = "user-1", caps: tuple[str, ...] = ("subscribe",)) -> str:
        return (
            AccessToken(self.key_id, self.secret)
            .with_tenant(self.tenant_id)
            .with_identity(sub, sub)
            .with_grants(session="*", role="student", caps=list(caps))
            .with_ttl(timedelta(minutes=10))
            .to_jwt()
        )


@pytest.fixture(scope="module")
async def key(pool: asyncpg.Pool) -> Key:
    tenant_id = await pool.fetchval(
        "INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"icpt-{secrets.token_hex(6)}"
    )
    k = Key(f"ck_{secrets.token_hex(8)}", str(tenant_id), secrets.token_urlsafe(48))
    await pool.execute(
        "INSERT INTO api_keys (id, tenant_id, secret) VALUES ($1, $2, $3)",
        k.key_id,
        tenant_id,
        k.secret,
    )
    return k


# ------------------------------------------------------------------------ probe service


def probe_handlers(pool: asyncpg.Pool) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    async def ping(request: bytes, context: Ctx) -> bytes:
        return b"pong:" + current_principal().subject.encode()

    async def fail(request: bytes, context: Ctx) -> bytes:
        raise ERRORS[request.decode()]()

    async def crash(request: bytes, context: Ctx) -> bytes:
        raise RuntimeError(SECRET_TEXT)

    async def duplicate(request: bytes, context: Ctx) -> bytes:
        # A real unique violation from PostgreSQL escaping the handler.
        name = f"dup-{secrets.token_hex(6)}"
        await pool.execute("INSERT INTO tenants (name) VALUES ($1)", name)
        await pool.execute("INSERT INTO tenants (name) VALUES ($1)", name)
        return b"unreachable"

    async def validate(request: bytes, context: Ctx) -> bytes:
        v = Validator()
        v.require_uuid("session_id", request.decode())
        v.require_range("capacity", 0, 1, 1000)
        v.raise_if_any()
        return b"valid"

    async def needs_record(request: bytes, context: Ctx) -> bytes:
        require(current_principal(), capability="record")
        return b"recording"

    async def self_abort(request: bytes, context: Ctx) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "handler's own status")

    async def stream(request: bytes, context: Ctx) -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"item-{i}".encode()
        if request == b"crash":
            raise RuntimeError(SECRET_TEXT)
        raise FailedPrecondition("SESSION_ENDED", "the session ended mid-stream")

    async def writer_stream(request: bytes, context: Ctx) -> None:
        await context.write(b"written")
        raise NotFound("room", "r-1")

    async def count(requests: AsyncIterator[bytes], context: Ctx) -> bytes:
        n = 0
        async for r in requests:
            if r == b"boom":
                raise FailedPrecondition("TOO_EARLY", "boom")
            n += 1
        return str(n).encode()

    async def echo(requests: AsyncIterator[bytes], context: Ctx) -> AsyncIterator[bytes]:
        async for r in requests:
            if r == b"boom":
                raise Aborted("CONCURRENT_MODIFICATION")
            yield r

    uu = grpc.unary_unary_rpc_method_handler
    return {
        "Ping": uu(ping),
        "Fail": uu(fail),
        "Crash": uu(crash),
        "Duplicate": uu(duplicate),
        "Validate": uu(validate),
        "NeedsRecord": uu(needs_record),
        "SelfAbort": uu(self_abort),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "WriterStream": grpc.unary_stream_rpc_method_handler(writer_stream),
        "Count": grpc.stream_unary_rpc_method_handler(count),
        "Echo": grpc.stream_stream_rpc_method_handler(echo),
    }


async def start(pool: asyncpg.Pool, limiter: RateLimiter, rate: int, burst: int) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=[
            TelemetryInterceptor(),
            ErrorInterceptor(),
            AuthInterceptor(KeyStore(pool)),
            RateLimitInterceptor(limiter, rate, burst),
        ]
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, probe_handlers(pool))]
    )
    return server


@dataclass
class Probe:
    channel: grpc.aio.Channel
    token: str

    def md(self, token: str | None = None, **extra: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token or self.token}"), *extra.items())

    async def unary(self, method: str, body: bytes = b"", token: str | None = None) -> bytes:
        out: bytes = await self.channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=_raw, response_deserializer=_raw
        )(body, metadata=self.md(token), timeout=10)
        return out

    async def error(self, call: Awaitable[Any]) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        return info.value


@pytest.fixture(scope="module")
async def limiter(redis_url: str, redis_prefix: str) -> AsyncIterator[RateLimiter]:
    client = aioredis.from_url(redis_url)
    yield RateLimiter(client, f"{redis_prefix}:icpt")
    async for k in client.scan_iter(match=f"{redis_prefix}:icpt*"):
        await client.delete(k)
    await client.aclose()  # type: ignore[attr-defined]  # stubs predate redis 5


@pytest.fixture(scope="module")
async def servers(pool: asyncpg.Pool, limiter: RateLimiter) -> AsyncIterator[dict[str, str]]:
    # "open": limiter disabled (rate 0); "limited": 1 per minute with a burst of 5.
    out: dict[str, str] = {}
    started = []
    for name, rate, burst in [("open", 0, 5), ("limited", 1, 5)]:
        server = await start(pool, limiter, rate, burst)
        out[name] = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        started.append(server)
    yield out
    for server in started:
        await server.stop(None)


@pytest.fixture
async def probe(servers: dict[str, str], key: Key) -> AsyncIterator[Probe]:
    async with grpc.aio.insecure_channel(servers["open"]) as ch:
        yield Probe(ch, key.token())


def details_of(err: grpc.aio.AioRpcError) -> tuple[status_pb2.Status, error_details_pb2.ErrorInfo]:
    status = rpc_status.from_call(err)
    assert status is not None
    infos = []
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            infos.append(info)
    assert len(infos) == 1, "exactly one ErrorInfo"
    assert infos[0].domain == "classmesh.dev"
    return status, infos[0]


def detail(status: status_pb2.Status, kind: type[Message]) -> Any:
    for d in status.details:
        if d.Is(kind.DESCRIPTOR):
            msg = kind()
            d.Unpack(msg)
            return msg
    return None


def trailing(err: grpc.aio.AioRpcError, key: str) -> list[str | bytes]:
    md = err.trailing_metadata()
    assert md is not None
    return [v for k, v in md if k == key]


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kind", "code", "reason", "extra"),
    [
        (
            "invalid",
            grpc.StatusCode.INVALID_ARGUMENT,
            "VALIDATION_FAILED",
            error_details_pb2.BadRequest,
        ),
        ("not_found", grpc.StatusCode.NOT_FOUND, "NOT_FOUND", error_details_pb2.ResourceInfo),
        ("precondition", grpc.StatusCode.FAILED_PRECONDITION, "SESSION_ENDED", None),
        ("exists", grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS", None),
        ("aborted", grpc.StatusCode.ABORTED, "CONCURRENT_MODIFICATION", None),
        ("denied", grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING", None),
        ("unauthenticated", grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED", None),
        (
            "exhausted",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "SESSION_FULL",
            error_details_pb2.RetryInfo,
        ),
        (
            "unavailable",
            grpc.StatusCode.UNAVAILABLE,
            "BACKEND_UNAVAILABLE",
            error_details_pb2.RetryInfo,
        ),
        ("deadline", grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", None),
        ("timeout", grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", None),
    ],
)
async def test_each_error_kind_maps_to_its_code_and_one_error_info(
    probe: Probe, kind: str, code: grpc.StatusCode, reason: str, extra: type | None
) -> None:
    err = await probe.error(probe.unary("Fail", kind.encode()))
    assert err.code() == code
    status, info = details_of(err)
    assert info.reason == reason
    if extra is not None:
        assert detail(status, extra) is not None


async def test_runtime_error_is_internal_with_correlation_id_and_no_traceback(
    probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    err = await probe.error(probe.unary("Crash"))
    assert err.code() == grpc.StatusCode.INTERNAL
    [cid] = trailing(err, "x-correlation-id")
    assert isinstance(cid, str) and len(cid) >= 16
    assert err.details() == f"internal error; correlation id {cid}"
    _, info = details_of(err)
    assert info.reason == "INTERNAL" and info.metadata["correlationId"] == cid
    everything = (err.details() or "") + repr(err.trailing_metadata())
    assert SECRET_TEXT not in everything and "Traceback" not in everything
    # ...but the server log has the traceback under the same id.
    logged = [r for r in caplog.records if getattr(r, "correlation_id", None) == cid]
    assert any(r.levelno == logging.ERROR and r.exc_info for r in logged)


async def test_database_violation_maps_without_leaking_sql(probe: Probe) -> None:
    err = await probe.error(probe.unary("Duplicate"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "tenants_name_key" not in (err.details() or "")
    assert "duplicate key" not in (err.details() or "")
    details_of(err)


async def test_validator_gives_bad_request_with_every_field(probe: Probe) -> None:
    err = await probe.error(probe.unary("Validate", b"nope"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status, info = details_of(err)
    assert info.reason == "VALIDATION_FAILED"
    bad = detail(status, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["session_id", "capacity"]


async def test_server_stream_failing_mid_way_keeps_items_then_maps(probe: Probe) -> None:
    call = probe.channel.unary_stream(
        f"/{SERVICE}/Stream", request_serializer=_raw, response_deserializer=_raw
    )(b"", metadata=probe.md(), timeout=10)
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for item in call:
            got.append(item)
    assert got == [b"item-0", b"item-1", b"item-2"]
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(info.value)[1].reason == "SESSION_ENDED"


async def test_server_stream_crash_mid_way_is_internal(probe: Probe) -> None:
    call = probe.channel.unary_stream(
        f"/{SERVICE}/Stream", request_serializer=_raw, response_deserializer=_raw
    )(b"crash", metadata=probe.md(), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert SECRET_TEXT not in (info.value.details() or "")


async def test_writer_style_stream_is_mapped(probe: Probe) -> None:
    call = probe.channel.unary_stream(
        f"/{SERVICE}/WriterStream", request_serializer=_raw, response_deserializer=_raw
    )(b"", metadata=probe.md(), timeout=10)
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for item in call:
            got.append(item)
    assert got == [b"written"]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_client_streaming_error_is_mapped(probe: Probe) -> None:
    count = probe.channel.stream_unary(
        f"/{SERVICE}/Count", request_serializer=_raw, response_deserializer=_raw
    )
    assert await count(iter([b"a", b"b"]), metadata=probe.md(), timeout=10) == b"2"
    err = await probe.error(count(iter([b"a", b"boom"]), metadata=probe.md(), timeout=10))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(err)[1].reason == "TOO_EARLY"


async def test_bidi_error_is_mapped_after_echoes(probe: Probe) -> None:
    call = probe.channel.stream_stream(
        f"/{SERVICE}/Echo", request_serializer=_raw, response_deserializer=_raw
    )(iter([b"x", b"y", b"boom"]), metadata=probe.md(), timeout=10)
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for item in call:
            got.append(item)
    assert got == [b"x", b"y"]
    assert info.value.code() == grpc.StatusCode.ABORTED


async def test_bidi_needs_a_token_too(probe: Probe) -> None:
    call = probe.channel.stream_stream(
        f"/{SERVICE}/Echo", request_serializer=_raw, response_deserializer=_raw
    )(iter([b"x"]), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_handler_that_aborted_itself_passes_through_untouched(probe: Probe) -> None:
    err = await probe.error(probe.unary("SelfAbort"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "handler's own status"
    assert rpc_status.from_call(err) is None
    assert len(trailing(err, "x-correlation-id")) == 1


async def test_capability_required_by_handler(probe: Probe, key: Key) -> None:
    err = await probe.error(probe.unary("NeedsRecord"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details_of(err)[1].metadata["requiredCapability"] == "record"
    recorder = key.token(caps=("record",))
    assert await probe.unary("NeedsRecord", token=recorder) == b"recording"


async def test_unknown_method_is_unimplemented(probe: Probe) -> None:
    err = await probe.error(probe.unary("NoSuchMethod"))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


# --------------------------------------------------------------------------- telemetry


async def test_correlation_id_is_echoed_and_access_line_logged(
    probe: Probe, key: Key, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    call = probe.channel.unary_unary(
        f"/{SERVICE}/Ping", request_serializer=_raw, response_deserializer=_raw
    )(b"", metadata=probe.md(**{"x-correlation-id": "req-0123456789"}), timeout=10)
    assert await call == b"pong:user-1"
    assert ("x-correlation-id", "req-0123456789") in tuple(await call.trailing_metadata() or ())
    err = await probe.error(
        probe.channel.unary_unary(
            f"/{SERVICE}/Fail", request_serializer=_raw, response_deserializer=_raw
        )(b"denied", metadata=probe.md(**{"x-correlation-id": "req-9876543210"}), timeout=10)
    )
    assert trailing(err, "x-correlation-id") == ["req-9876543210"]

    lines = {
        r.correlation_id: r  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "classmesh.rpc" and r.getMessage() == "rpc"
    }
    ok, denied = lines["req-0123456789"], lines["req-9876543210"]
    assert ok.method == f"/{SERVICE}/Ping"  # type: ignore[attr-defined]
    assert ok.code == "OK"  # type: ignore[attr-defined]
    assert ok.tenant == key.tenant_id  # type: ignore[attr-defined]
    assert ok.subject == "user-1"  # type: ignore[attr-defined]
    assert ok.latency_ms >= 0  # type: ignore[attr-defined]
    assert "127.0.0.1" in ok.peer  # type: ignore[attr-defined]
    assert denied.code == "PERMISSION_DENIED"  # type: ignore[attr-defined]


async def test_generated_correlation_id_when_none_sent(probe: Probe) -> None:
    call = probe.channel.unary_unary(
        f"/{SERVICE}/Ping", request_serializer=_raw, response_deserializer=_raw
    )(b"", metadata=probe.md(), timeout=10)
    await call
    [cid] = [v for k, v in (await call.trailing_metadata() or ()) if k == "x-correlation-id"]
    assert isinstance(cid, str) and len(cid) == 32


# ------------------------------------------------------------------------- rate limits


async def test_rate_limit_admits_exactly_the_burst_then_retry_info(
    servers: dict[str, str], key: Key
) -> None:
    async with grpc.aio.insecure_channel(servers["limited"]) as ch:
        probe = Probe(ch, key.token(sub=f"rl-{secrets.token_hex(4)}"))
        results = await asyncio.gather(
            *(probe.unary("Ping") for _ in range(12)), return_exceptions=True
        )
        ok = [r for r in results if r == b"pong:" + probe_subject(probe)]
        denied = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(ok) == 5
        assert len(denied) == 7
        for err in denied:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            status, info = details_of(err)
            assert info.reason == "RATE_LIMITED"
            retry = detail(status, error_details_pb2.RetryInfo)
            # 1 per minute: the next request is about a minute away.
            assert 0 < retry.retry_delay.seconds <= 60
            assert detail(status, error_details_pb2.QuotaFailure) is not None

        # Buckets are per method and per subject: neither is touched by the above.
        assert (
            await probe.unary(
                "NeedsRecord", token=key.token(sub=probe_subject(probe).decode(), caps=("record",))
            )
            == b"recording"
        )
        other = key.token(sub=f"rl-{secrets.token_hex(4)}")
        assert (await probe.unary("Ping", token=other)).startswith(b"pong:")


def probe_subject(probe: Probe) -> bytes:
    return str(jwt.decode(probe.token, options={"verify_signature": False})["sub"]).encode()


async def test_zero_rate_disables_the_limiter(probe: Probe) -> None:
    results = await asyncio.gather(*(probe.unary("Ping") for _ in range(20)))
    assert all(r == b"pong:user-1" for r in results)
