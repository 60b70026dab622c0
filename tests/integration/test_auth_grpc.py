"""Auth matrix through a real grpc.aio server, keys in the real `tenants`/`api_keys` tables."""

from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from classmesh.core.auth import AccessToken, KeyStore, current_principal, require
from classmesh.core.interceptors import AuthInterceptor, ErrorInterceptor, TelemetryInterceptor

SERVICE = "classmesh.test.v1.ProbeService"


def _raw(data: bytes) -> bytes:
    # Messages are raw bytes: the probe service has no protobuf schema.
    return data


@dataclass(frozen=True)
class Key:
    key_id: str
    tenant_id: str
    secret: str


@dataclass(frozen=True)
class Keys:
    live: Key
    other_tenant: Key
    revoked: Key


async def _tenant_with_key(pool: asyncpg.Pool, *, revoked: bool = False) -> Key:
    tenant_id = await pool.fetchval(
        "INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"auth-{secrets.token_hex(6)}"
    )
    key = Key(f"ck_{secrets.token_hex(8)}", str(tenant_id), secrets.token_urlsafe(48))
    await pool.execute(
        "INSERT INTO api_keys (id, tenant_id, secret, revoked_at) VALUES ($1, $2, $3, $4)",
        key.key_id,
        tenant_id,
        key.secret,
        datetime.now(UTC) - timedelta(seconds=1) if revoked else None,
    )
    return key


async def _key_for(pool: asyncpg.Pool, tenant_id: str, *, revoked: bool) -> Key:
    key = Key(f"ck_{secrets.token_hex(8)}", tenant_id, secrets.token_urlsafe(48))
    await pool.execute(
        "INSERT INTO api_keys (id, tenant_id, secret, revoked_at) VALUES ($1, $2, $3, $4)",
        key.key_id,
        uuid.UUID(tenant_id),
        key.secret,
        datetime.now(UTC) - timedelta(seconds=1) if revoked else None,
    )
    return key


@pytest.fixture(scope="module")
async def keys(pool: asyncpg.Pool) -> Keys:
    live = await _tenant_with_key(pool)
    other = await _tenant_with_key(pool)
    revoked = await _key_for(pool, live.tenant_id, revoked=True)
    return Keys(live=live, other_tenant=other, revoked=revoked)


# ------------------------------------------------------------------------ probe server


async def whoami(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    p = current_principal()
    return json.dumps(
        {"tenant": p.tenant_id, "subject": p.subject, "role": p.role, "session": p.session_id}
    ).encode()


async def guarded(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    # The service layer's check: instructor of this session who may publish.
    require(
        current_principal(),
        session_id=request.decode(),
        roles={"instructor"},
        capability="publish",
    )
    return b"ok"


@pytest.fixture(scope="module")
async def target(pool: asyncpg.Pool) -> AsyncIterator[str]:
    server = grpc.aio.server(
        interceptors=[
            TelemetryInterceptor(),
            ErrorInterceptor(),
            AuthInterceptor(KeyStore(pool, leeway_seconds=60)),
        ]
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Whoami": grpc.unary_unary_rpc_method_handler(whoami),
                    "Guarded": grpc.unary_unary_rpc_method_handler(guarded),
                },
            )
        ]
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(target) as ch:
        yield ch


async def call(
    channel: grpc.aio.Channel, method: str, token: str | None, body: bytes = b""
) -> bytes:
    md = (("authorization", f"Bearer {token}"),) if token is not None else ()
    stub = channel.unary_unary(
        f"/{SERVICE}/{method}", request_serializer=_raw, response_deserializer=_raw
    )
    result: bytes = await stub(body, metadata=md, timeout=10)
    return result


async def failure(
    channel: grpc.aio.Channel, method: str, token: str | None, body: bytes = b""
) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(channel, method, token, body)
    err = info.value
    status = rpc_status.from_call(err)
    assert status is not None, "every error carries google.rpc.Status details"
    reasons = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            ei = error_details_pb2.ErrorInfo()
            detail.Unpack(ei)
            assert ei.domain == "classmesh.dev"
            reasons.append(ei.reason)
    assert len(reasons) == 1
    return err.code(), reasons[0]


def mint(
    key: Key,
    *,
    tenant: str | None = None,
    role: str = "instructor",
    session: str = "*",
    caps: tuple[str, ...] = ("publish", "subscribe"),
    iat: datetime | None = None,
    nbf: datetime | None = None,
) -> str:
    t = (
        AccessToken(key.key_id, key.secret)
        .with_tenant(tenant or key.tenant_id)
        .with_identity("user-42", "Grace")
        .with_grants(session=session, role=role, caps=list(caps))
        .with_ttl(timedelta(hours=1))
    )
    if iat is not None:
        t.with_issued_at(iat)
    if nbf is not None:
        t.with_nbf(nbf)
    return t.to_jwt()


def _expired_by(seconds_past: int, *, round_up: bool) -> datetime:
    """iat for a 1 h token whose exp lies `seconds_past` (within < 1 s) before now."""
    now = time.time()
    whole = math.ceil(now) if round_up else math.floor(now)
    return datetime.fromtimestamp(whole - seconds_past - 3600, UTC)


# ------------------------------------------------------------------------------ tests


async def test_valid_token_reaches_the_handler_as_its_principal(
    channel: grpc.aio.Channel, keys: Keys
) -> None:
    body = json.loads(await call(channel, "Whoami", mint(keys.live)))
    assert body == {
        "tenant": keys.live.tenant_id,
        "subject": "user-42",
        "role": "instructor",
        "session": "*",
    }


def _claims(key: Key) -> dict[str, Any]:
    return jwt.decode(mint(key), options={"verify_signature": False})


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "TOKEN_MISSING"),
        ("not_bearer", "TOKEN_INVALID"),
        ("expired", "TOKEN_EXPIRED"),
        ("future_nbf", "TOKEN_NOT_YET_VALID"),
        ("bad_signature", "TOKEN_INVALID"),
        ("alg_none", "TOKEN_INVALID"),
        ("alg_hs512", "TOKEN_INVALID"),
        ("unknown_kid", "API_KEY_UNKNOWN"),
        ("other_tenants_key", "TOKEN_INVALID"),
        ("revoked_key", "API_KEY_UNKNOWN"),
        ("garbage", "TOKEN_INVALID"),
    ],
)
async def test_auth_matrix_unauthenticated(
    channel: grpc.aio.Channel, keys: Keys, case: str, reason: str
) -> None:
    live = keys.live
    tokens: dict[str, str | None] = {
        "missing": None,
        "expired": mint(live, iat=datetime.now(UTC) - timedelta(hours=2)),
        "future_nbf": mint(live, nbf=datetime.now(UTC) + timedelta(minutes=5)),
        "bad_signature": mint(Key(live.key_id, live.tenant_id, secrets.token_urlsafe(48))),
        "alg_none": jwt.encode(
            _claims(live),
            None,  # type: ignore[arg-type]
            algorithm="none",
            headers={"kid": live.key_id},
        ),
        "alg_hs512": jwt.encode(
            _claims(live), live.secret * 2, algorithm="HS512", headers={"kid": live.key_id}
        ),
        "unknown_kid": mint(Key("ck_nobody_here", live.tenant_id, live.secret)),
        # Correctly signed by the other tenant's key, claiming this tenant.
        "other_tenants_key": mint(keys.other_tenant, tenant=live.tenant_id),
        "revoked_key": mint(keys.revoked),
        "garbage": "not.a.jwt",
    }
    if case == "not_bearer":
        stub = channel.unary_unary(
            f"/{SERVICE}/Whoami", request_serializer=_raw, response_deserializer=_raw
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(b"", metadata=(("authorization", f"Basic {mint(live)}"),), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        return
    code, got = await failure(channel, "Whoami", tokens[case])
    assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, reason)


async def test_other_tenants_key_works_for_its_own_tenant(
    channel: grpc.aio.Channel, keys: Keys
) -> None:
    # Control for the matrix row above: the key itself is fine.
    body = json.loads(await call(channel, "Whoami", mint(keys.other_tenant)))
    assert body["tenant"] == keys.other_tenant.tenant_id


async def test_59_seconds_past_expiry_is_accepted(channel: grpc.aio.Channel, keys: Keys) -> None:
    token = mint(keys.live, iat=_expired_by(59, round_up=True))
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    assert 58 < time.time() - exp <= 59.5
    assert json.loads(await call(channel, "Whoami", token))["subject"] == "user-42"


async def test_61_seconds_past_expiry_is_rejected(channel: grpc.aio.Channel, keys: Keys) -> None:
    token = mint(keys.live, iat=_expired_by(61, round_up=False))
    code, reason = await failure(channel, "Whoami", token)
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")


async def test_valid_token_without_the_grant_is_permission_denied(
    channel: grpc.aio.Channel, keys: Keys
) -> None:
    session = str(uuid.uuid4())
    ok = mint(keys.live, role="instructor", session=session, caps=("publish",))
    assert await call(channel, "Guarded", ok, session.encode()) == b"ok"

    denied = [
        mint(keys.live, role="student", session=session, caps=("publish",)),
        mint(keys.live, role="instructor", session=session, caps=("subscribe",)),
        mint(keys.live, role="instructor", session=str(uuid.uuid4()), caps=("publish",)),
    ]
    for token in denied:
        code, reason = await failure(channel, "Guarded", token, session.encode())
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING")


async def test_admin_passes_the_role_check(channel: grpc.aio.Channel, keys: Keys) -> None:
    session = str(uuid.uuid4())
    admin = mint(keys.live, role="admin", caps=("publish",))
    assert await call(channel, "Guarded", admin, session.encode()) == b"ok"


async def test_health_is_public(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_revocation_in_the_database_applies_after_the_cache_window(
    pool: asyncpg.Pool, keys: Keys
) -> None:
    key = await _key_for(pool, keys.live.tenant_id, revoked=False)
    store = KeyStore(pool, leeway_seconds=60, cache_ttl=0.0)
    token = mint(key)
    assert (await store.verify(token)).key_id == key.key_id
    await pool.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key.key_id)
    with pytest.raises(Exception) as info:
        await store.verify(token)
    assert getattr(info.value, "reason", None) == "API_KEY_UNKNOWN"


def test_reflection_and_health_are_public_everything_else_is_not(pool: asyncpg.Pool) -> None:
    interceptor = AuthInterceptor(KeyStore(pool), public_methods=["/x.v1.Open/Call"])
    for method in [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/x.v1.Open/Call",
    ]:
        assert interceptor.is_public(method), method
    for method in [f"/{SERVICE}/Whoami", "/x.v1.Open/Other", "/grpc.health.v1.HealthX/Check"]:
        assert not interceptor.is_public(method), method
