"""Access token minting and verification, without a server (StaticKeyStore, pinned clock)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest

from classmesh.core.auth import (
    AccessToken,
    ApiKey,
    KeyStore,
    Principal,
    StaticKeyStore,
    current_principal,
    require,
    set_principal,
)
from classmesh.core.errors import PermissionDenied, Unauthenticated

NOW = 1_900_000_000.0  # pinned clock: every time edge below is exact
TENANT = str(uuid.uuid4())
OTHER_TENANT = str(uuid.uuid4())
SESSION = str(uuid.uuid4())
KEY = ApiKey("ck_live", TENANT, "s" * 64)
OTHER = ApiKey("ck_other", OTHER_TENANT, "o" * 64)
REVOKED = ApiKey("ck_revoked", TENANT, "r" * 40, revoked_at=datetime.fromtimestamp(NOW - 5, UTC))
REVOKED_LATER = ApiKey(
    "ck_later", TENANT, "l" * 40, revoked_at=datetime.fromtimestamp(NOW + 3600, UTC)
)


def store(**kw: Any) -> StaticKeyStore:
    return StaticKeyStore([KEY, OTHER, REVOKED, REVOKED_LATER], clock=lambda: NOW, **kw)


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def token(
    key: ApiKey = KEY, *, tenant: str = TENANT, exp: float | None = None, **grants: Any
) -> str:
    t = (
        AccessToken(key.key_id, key.secret)
        .with_tenant(tenant)
        .with_identity("user-1", "Ada Lovelace")
        .with_grants(
            session=grants.get("session", SESSION),
            role=grants.get("role", "student"),
            caps=grants.get("caps", ["subscribe", "chat"]),
        )
    )
    if exp is None:
        t.with_issued_at(at(NOW - 10)).with_ttl(timedelta(hours=1))
    else:
        t.with_issued_at(at(exp - 3600)).with_ttl(timedelta(hours=1))
    return t.to_jwt()


def signed(claims: dict[str, Any], key: ApiKey = KEY, **header: Any) -> str:
    return jwt.encode(claims, key.secret, algorithm="HS256", headers={"kid": key.key_id, **header})


def base_claims() -> dict[str, Any]:
    return jwt.decode(token(), options={"verify_signature": False})


def verify(tok: str, ks: KeyStore | None = None) -> Principal:
    return asyncio.run((ks or store()).verify(tok))


def rejected(tok: str, reason: str, ks: KeyStore | None = None) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        verify(tok, ks)
    assert info.value.reason == reason, info.value.message
    return info.value


# ---------------------------------------------------------------------------- minting


def test_minted_token_has_the_documented_shape() -> None:
    tok = token(caps=["publish", "subscribe"])
    header = jwt.get_unverified_header(tok)
    assert header["alg"] == "HS256" and header["kid"] == "ck_live"
    claims = jwt.decode(tok, options={"verify_signature": False})
    assert claims["iss"] == "ck_live"
    assert claims["sub"] == "user-1" and claims["name"] == "Ada Lovelace"
    assert claims["tenant"] == TENANT
    assert claims["exp"] - claims["iat"] == 3600 and claims["nbf"] == claims["iat"]
    assert isinstance(claims["jti"], str) and claims["jti"]
    assert claims["grants"] == {
        "session": SESSION,
        "role": "student",
        "caps": ["publish", "subscribe"],
    }


@pytest.mark.parametrize(
    "build",
    [
        lambda t: t.with_grants(role="teacher"),
        lambda t: t.with_grants(role="guest"),  # guests need one session
        lambda t: t.with_grants(role="student", session="room-1"),
        lambda t: t.with_grants(role="student", caps=["Publish!"]),
        lambda t: t.with_identity("", "x"),
        lambda t: t.with_tenant("acme"),
    ],
)
def test_minting_refuses_what_verification_would_refuse(build: Any) -> None:
    t = AccessToken(KEY.key_id, KEY.secret).with_tenant(TENANT).with_identity("u", "n")
    t.with_grants(role="student")
    with pytest.raises(ValueError):
        build(t).to_jwt()


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AccessToken("k", "s").with_ttl(timedelta(0))


# ------------------------------------------------------------------------ verification


def test_valid_token_gives_the_principal() -> None:
    p = verify(token(caps=["publish", "chat"], role="instructor"))
    assert p.tenant_id == TENANT
    assert p.subject == "user-1" and p.name == "Ada Lovelace"
    assert p.role == "instructor" and not p.guest
    assert p.session_id == SESSION
    assert p.capabilities == frozenset({"publish", "chat"})
    assert p.key_id == "ck_live" and p.token_id
    assert p.expires_at == at(NOW - 10 + 3600)


def test_guest_flag_follows_role() -> None:
    assert verify(token(role="guest", caps=["subscribe"])).guest


@pytest.mark.parametrize(
    ("past", "ok"), [(0, True), (59, True), (59.999, True), (60, False), (61, False)]
)
def test_expiry_leeway_is_sixty_seconds(past: float, ok: bool) -> None:
    # exp is an integer claim: put it exactly `past` seconds before the pinned clock.
    exp = NOW - 61
    ks = store()
    ks._clock = lambda: exp + past  # noqa: SLF001 - the clock is the test's lever
    tok = token(exp=exp)
    if ok:
        assert verify(tok, ks).subject == "user-1"
    else:
        rejected(tok, "TOKEN_EXPIRED", ks)


@pytest.mark.parametrize(("ahead", "ok"), [(59, True), (60, True), (61, False)])
def test_nbf_leeway_is_sixty_seconds(ahead: int, ok: bool) -> None:
    claims = base_claims() | {"nbf": int(NOW) + ahead}
    if ok:
        verify(signed(claims))
    else:
        rejected(signed(claims), "TOKEN_NOT_YET_VALID")


def test_iat_far_in_the_future_is_not_yet_valid() -> None:
    claims = base_claims() | {"iat": int(NOW) + 600, "nbf": int(NOW)}
    rejected(signed(claims), "TOKEN_NOT_YET_VALID")


def test_bad_signature() -> None:
    forged = ApiKey(KEY.key_id, TENANT, "x" * 40)
    rejected(token(forged), "TOKEN_INVALID")


def test_alg_none_is_refused() -> None:
    tok = jwt.encode(base_claims(), None, algorithm="none", headers={"kid": KEY.key_id})  # type: ignore[arg-type]
    rejected(tok, "TOKEN_INVALID")


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_algorithms_are_refused_even_with_the_right_secret(alg: str) -> None:
    tok = jwt.encode(base_claims(), KEY.secret, algorithm=alg, headers={"kid": KEY.key_id})
    rejected(tok, "TOKEN_INVALID")


def test_unknown_kid() -> None:
    rejected(token(ApiKey("ck_nobody", TENANT, "n" * 40)), "API_KEY_UNKNOWN")


def test_missing_kid() -> None:
    tok = jwt.encode(base_claims(), KEY.secret, algorithm="HS256")
    rejected(tok, "TOKEN_INVALID")


def test_revoked_key_is_unknown() -> None:
    rejected(token(REVOKED), "API_KEY_UNKNOWN")


def test_key_revoked_in_the_future_still_works_until_then() -> None:
    assert verify(token(REVOKED_LATER)).key_id == "ck_later"


def test_key_of_another_tenant_is_refused() -> None:
    # Signed correctly by OTHER tenant's key, but claims to act for TENANT.
    rejected(token(OTHER, tenant=TENANT), "TOKEN_INVALID")


def test_issuer_must_equal_kid() -> None:
    rejected(signed(base_claims() | {"iss": "ck_other"}), "TOKEN_INVALID")


@pytest.mark.parametrize("claim", ["iss", "sub", "tenant", "exp", "nbf", "iat", "jti", "grants"])
def test_every_required_claim(claim: str) -> None:
    claims = base_claims()
    del claims[claim]
    rejected(signed(claims), "TOKEN_INVALID")


@pytest.mark.parametrize(
    "patch",
    [
        {"grants": "admin"},
        {"grants": {"session": SESSION, "role": "root", "caps": []}},
        {"grants": {"session": SESSION, "role": "student", "caps": "publish"}},
        {"grants": {"session": SESSION, "role": "student", "caps": [1]}},
        {"grants": {"session": SESSION, "role": "student", "caps": ["x"] * 65}},
        {"grants": {"session": "room-1", "role": "student", "caps": []}},
        {"grants": {"session": 7, "role": "student", "caps": []}},
        {"grants": {"session": "*", "role": "guest", "caps": []}},
        {"tenant": "acme"},
        {"sub": ""},
        {"sub": "u" * 129},
        {"name": 5},
        {"exp": "tomorrow"},
        {"exp": True},
    ],
)
def test_malformed_claims_are_invalid(patch: dict[str, Any]) -> None:
    rejected(signed(base_claims() | patch), "TOKEN_INVALID")


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "Bearer x.y.z"])
def test_garbage_is_invalid(garbage: str) -> None:
    rejected(garbage, "TOKEN_INVALID")


def test_revocation_takes_effect_when_the_cache_entry_goes() -> None:
    ks = StaticKeyStore([KEY], clock=lambda: NOW, cache_ttl=3600)
    tok = token()
    verify(tok, ks)
    ks.keys[KEY.key_id] = ApiKey(KEY.key_id, TENANT, KEY.secret, revoked_at=at(NOW - 1))
    verify(tok, ks)  # still cached: documented window
    ks.invalidate(KEY.key_id)
    rejected(tok, "API_KEY_UNKNOWN", ks)


# ---------------------------------------------------------------------- grants checks


def principal(**kw: Any) -> Principal:
    base: dict[str, Any] = dict(
        tenant_id=TENANT,
        subject="u1",
        name="U",
        role="student",
        session_id=SESSION,
        capabilities=frozenset({"subscribe"}),
        key_id="ck_live",
        token_id="j",
        expires_at=at(NOW),
        guest=False,
    )
    return Principal(**(base | kw))


def test_require_passes_when_grants_cover_the_request() -> None:
    require(principal(), session_id=SESSION.upper(), roles={"student"}, capability="subscribe")
    require(principal(session_id="*"), session_id=str(uuid.uuid4()))


def test_require_names_what_is_missing() -> None:
    other = str(uuid.uuid4())
    with pytest.raises(PermissionDenied) as info:
        require(
            principal(), session_id=other, roles={"instructor", "assistant"}, capability="publish"
        )
    err = info.value
    assert err.reason == "PERMISSION_MISSING"
    assert err.metadata == {
        "requiredSession": other,
        "requiredRoles": "assistant,instructor",
        "requiredCapability": "publish",
    }


def test_admin_passes_role_checks_but_not_capability_or_session_checks() -> None:
    admin = principal(role="admin", capabilities=frozenset())
    require(admin, roles={"instructor"})
    with pytest.raises(PermissionDenied):
        require(admin, capability="record")
    with pytest.raises(PermissionDenied):
        require(admin, session_id=str(uuid.uuid4()))


def test_current_principal_needs_an_authenticated_call() -> None:
    async def outside() -> None:
        current_principal()

    with pytest.raises(Unauthenticated) as info:
        asyncio.run(outside())
    assert info.value.reason == "TOKEN_MISSING"

    async def inside() -> Principal:
        set_principal(principal())
        return current_principal()

    assert asyncio.run(inside()).subject == "u1"


async def test_verified_token_cache_respects_expiry_and_invalidation() -> None:
    now = [NOW]
    ks = StaticKeyStore([KEY], clock=lambda: now[0], cache_ttl=60.0)
    tok = token(exp=NOW + 30)
    first = await ks.verify(tok)
    # The key disappears: the cached verification still stands (same window as the key cache).
    ks.keys.clear()
    assert await ks.verify(tok) == first
    # Past exp + leeway the cached entry is not trusted: the token is verified afresh.
    now[0] = NOW + 30 + 61
    with pytest.raises(Unauthenticated):
        await ks.verify(tok)
    # invalidate() forgets verified tokens too.
    now[0] = NOW
    ks.keys[KEY.key_id] = KEY
    await ks.verify(tok)
    ks.keys.clear()
    ks.invalidate(KEY.key_id)
    with pytest.raises(Unauthenticated) as info:
        await ks.verify(tok)
    assert info.value.reason == "API_KEY_UNKNOWN"
