"""Access tokens (LiveKit style), their verification, and the per-RPC principal.

A tenant owns API keys (`api_keys`: key id + secret). A partner backend mints a JWT signed
with one of its keys; the server verifies it and serves the RPC as that token's principal.

Token format (JWS compact, HS256 only)::

    header  {"alg": "HS256", "typ": "JWT", "kid": "<api key id>"}
    claims  {
      "iss": "<api key id>",            # must equal kid
      "sub": "<user id, 1-128 chars>",
      "tenant": "<tenant uuid>",        # must own the key
      "name": "<display name, 0-256 chars>",
      "iat": <unix s>, "nbf": <unix s>, "exp": <unix s>,
      "jti": "<token id, 1-128 chars>",
      "grants": {
        "session": "<session uuid>" | "*",
        "role": "instructor" | "assistant" | "student" | "guest" | "admin",
        "caps": ["publish", "subscribe", "chat", "moderate", "record", "admin", ...]
      }
    }

Verification pins the algorithm to HS256 (so `alg=none`, RS256 key confusion and every
other algorithm are refused before any key is looked up) and accepts `leeway_seconds` (60 by
default) of clock skew on `exp`, `nbf` and `iat`. Failures are `Unauthenticated` with reason
TOKEN_MISSING, TOKEN_INVALID, TOKEN_EXPIRED, TOKEN_NOT_YET_VALID or API_KEY_UNKNOWN.

Keys are cached in-process for `cache_ttl` seconds (10 by default): a revoked key keeps
verifying on an instance for at most that long after `revoked_at` is set. Lookups of unknown
key ids are cached too (shorter), so a flood of random `kid`s cannot hammer PostgreSQL.

Roles: `admin` passes every role check within its tenant; session and capability grants are
still checked for it (least privilege: an admin token without `record` cannot record).
Guests must be scoped to one session.
"""

from __future__ import annotations

import contextvars
import re
import secrets
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import jwt

from classmesh.core.errors import PermissionDenied, Unauthenticated

__all__ = [
    "ALGORITHM",
    "ANY_SESSION",
    "KNOWN_CAPABILITIES",
    "ROLES",
    "AccessToken",
    "ApiKey",
    "KeyStore",
    "Principal",
    "StaticKeyStore",
    "current_principal",
    "optional_principal",
    "require",
    "reset_principal",
    "set_principal",
]

ALGORITHM = "HS256"
ANY_SESSION = "*"
ROLES = frozenset({"instructor", "assistant", "student", "guest", "admin"})
#: Capabilities the services check today. Other well-formed names are accepted so a token
#: minted for a newer server still verifies on an older one (they grant nothing here).
KNOWN_CAPABILITIES = frozenset({"publish", "subscribe", "chat", "moderate", "record", "admin"})

_CAP = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
_MAX_CAPS = 64
_REQUIRED_CLAIMS = ["iss", "sub", "tenant", "exp", "nbf", "iat", "jti", "grants"]
_DEFAULT_TTL = timedelta(hours=1)


@dataclass(frozen=True)
class Principal:
    """Who is calling, as proved by a verified token."""

    tenant_id: str
    subject: str
    name: str
    role: str
    #: Session the token is scoped to, or "*" for any session of the tenant.
    session_id: str
    capabilities: frozenset[str]
    key_id: str
    token_id: str
    expires_at: datetime
    guest: bool

    def has_session(self, session_id: str) -> bool:
        return self.session_id == ANY_SESSION or _norm_id(session_id) == self.session_id

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


@dataclass(frozen=True)
class ApiKey:
    """One row of `api_keys` as the verifier needs it."""

    key_id: str
    tenant_id: str
    secret: str
    revoked_at: datetime | None = None


# ----------------------------------------------------------------------------- minting


class AccessToken:
    """Fluent token minting for the server CLI and tests (the SDK has its own copy)::

    AccessToken(key_id, secret).with_tenant(tid).with_identity("u1", "Ada")
        .with_grants(session=sid, role="student", caps=["subscribe", "chat"])
        .with_ttl(timedelta(minutes=30)).to_jwt()
    """

    def __init__(self, key_id: str, secret: str) -> None:
        self._key_id = key_id
        self._secret = secret
        self._tenant = ""
        self._sub = ""
        self._name = ""
        self._session = ANY_SESSION
        self._role = ""
        self._caps: list[str] = []
        self._ttl = _DEFAULT_TTL
        self._iat: datetime | None = None
        self._nbf: datetime | None = None
        self._jti: str | None = None

    def with_tenant(self, tenant_id: str) -> AccessToken:
        self._tenant = tenant_id
        return self

    def with_identity(self, sub: str, name: str = "") -> AccessToken:
        self._sub = sub
        self._name = name
        return self

    def with_grants(
        self, *, session: str = ANY_SESSION, role: str, caps: Iterable[str] = ()
    ) -> AccessToken:
        self._session = session
        self._role = role
        self._caps = list(dict.fromkeys(caps))
        return self

    def with_ttl(self, ttl: timedelta) -> AccessToken:
        if ttl <= timedelta(0):
            raise ValueError("ttl must be positive")
        self._ttl = ttl
        return self

    def with_issued_at(self, iat: datetime) -> AccessToken:
        """Backdate or postdate issue time (exp = iat + ttl); default: now."""
        self._iat = iat
        return self

    def with_nbf(self, nbf: datetime) -> AccessToken:
        self._nbf = nbf
        return self

    def with_token_id(self, jti: str) -> AccessToken:
        self._jti = jti
        return self

    def claims(self) -> dict[str, Any]:
        """The claims `to_jwt` signs (checked the way the verifier checks them)."""
        iat = self._iat or datetime.now(UTC)
        nbf = self._nbf or iat
        claims: dict[str, Any] = {
            "iss": self._key_id,
            "sub": self._sub,
            "tenant": self._tenant,
            "name": self._name,
            "iat": int(iat.timestamp()),
            "nbf": int(nbf.timestamp()),
            "exp": int((iat + self._ttl).timestamp()),
            "jti": self._jti or secrets.token_urlsafe(16),
            "grants": {"session": self._session, "role": self._role, "caps": self._caps},
        }
        try:
            _parse_identity(claims)
        except Unauthenticated as exc:
            raise ValueError(exc.message) from None
        return claims

    def to_jwt(self) -> str:
        return jwt.encode(
            self.claims(), self._secret, algorithm=ALGORITHM, headers={"kid": self._key_id}
        )


# ------------------------------------------------------------------------ verification


def _invalid(message: str) -> Unauthenticated:
    return Unauthenticated("TOKEN_INVALID", message)


def _norm_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        return value


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    # bool is an int in Python; `"exp": true` is still malformed.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"claim {name!r} must be a number")
    return float(value)


def _string(claims: Mapping[str, Any], name: str, lo: int, hi: int) -> str:
    value = claims.get(name, "")
    if not isinstance(value, str) or not lo <= len(value) <= hi:
        raise _invalid(f"claim {name!r} must be a string of {lo}-{hi} characters")
    return value


@dataclass(frozen=True)
class _Identity:
    tenant: str
    sub: str
    name: str
    jti: str
    session: str
    role: str
    caps: frozenset[str]


def _parse_identity(claims: Mapping[str, Any]) -> _Identity:
    """Shape checks on everything but signature and time (shared by mint and verify)."""
    tenant = _string(claims, "tenant", 1, 64)
    try:
        tenant = str(uuid.UUID(tenant))
    except ValueError:
        raise _invalid("claim 'tenant' must be a UUID") from None
    sub = _string(claims, "sub", 1, 128)
    name = _string(claims, "name", 0, 256)
    jti = _string(claims, "jti", 1, 128)
    grants = claims.get("grants")
    if not isinstance(grants, dict):
        raise _invalid("claim 'grants' must be an object")
    session = grants.get("session", ANY_SESSION)
    if not isinstance(session, str):
        raise _invalid("grants.session must be a string")
    if session != ANY_SESSION:
        try:
            session = str(uuid.UUID(session))
        except ValueError:
            raise _invalid("grants.session must be a session UUID or '*'") from None
    role = grants.get("role")
    if role not in ROLES:
        raise _invalid(f"grants.role must be one of {', '.join(sorted(ROLES))}")
    assert isinstance(role, str)
    caps = grants.get("caps", [])
    if (
        not isinstance(caps, list)
        or len(caps) > _MAX_CAPS
        or not all(isinstance(c, str) and _CAP.match(c) for c in caps)
    ):
        raise _invalid("grants.caps must be a list of capability names")
    if role == "guest" and session == ANY_SESSION:
        raise _invalid("guest tokens must be scoped to one session")
    return _Identity(tenant, sub, name, jti, session, role, frozenset(caps))


class KeyStore:
    """Verifies access tokens against the tenants' API keys in PostgreSQL.

    `clock` returns Unix seconds; tests inject one to pin expiry edges exactly.
    """

    #: Unknown key ids are remembered for less time than known keys, so a key created a
    #: moment after a failed attempt starts working quickly.
    negative_cache_ttl: float = 2.0
    #: Upper bound of cached entries; past it the cache is dropped (ids are attacker-chosen).
    max_cache_entries: int = 10_000

    def __init__(
        self,
        pool: asyncpg.Pool | None,
        *,
        leeway_seconds: float = 60,
        cache_ttl: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self.leeway = float(leeway_seconds)
        self.cache_ttl = float(cache_ttl)
        self._clock = clock
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}
        # token -> (principal, monotonic time verified, exp). Verifying a JWT (HMAC, JSON,
        # claim checks) is a large share of a small RPC's cost; a token already verified
        # is trusted again for at most `cache_ttl`, the same window a cached key gets, so
        # revocation takes effect no later than without this cache.
        self._verified: dict[str, tuple[Principal, float, float]] = {}

    async def _fetch(self, key_id: str) -> ApiKey | None:
        if self._pool is None:
            raise RuntimeError("KeyStore has no database pool")
        row = await self._pool.fetchrow(
            "SELECT id, tenant_id, secret, revoked_at FROM api_keys WHERE id = $1", key_id
        )
        if row is None:
            return None
        return ApiKey(
            key_id=row["id"],
            tenant_id=str(row["tenant_id"]),
            secret=row["secret"],
            revoked_at=row["revoked_at"],
        )

    async def get_key(self, key_id: str) -> ApiKey | None:
        now = time.monotonic()
        hit = self._cache.get(key_id)
        if hit is not None:
            key, fetched = hit
            ttl = self.cache_ttl if key is not None else self.negative_cache_ttl
            if now - fetched < ttl:
                return key
        key = await self._fetch(key_id)
        if len(self._cache) >= self.max_cache_entries:
            self._cache.clear()
        self._cache[key_id] = (key, now)
        return key

    def invalidate(self, key_id: str | None = None) -> None:
        """Forget one cached key (or all), e.g. right after revoking it on this instance."""
        if key_id is None:
            self._cache.clear()
        else:
            self._cache.pop(key_id, None)
        self._verified.clear()

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token; `Unauthenticated` for anything else."""
        hit = self._verified.get(token)
        if hit is not None:
            principal, verified_at, exp = hit
            if (
                time.monotonic() - verified_at < self.cache_ttl
                and self._clock() < exp + self.leeway
            ):
                return principal
            del self._verified[token]
        principal = await self._verify(token)
        if self.cache_ttl > 0:
            if len(self._verified) >= self.max_cache_entries:
                self._verified.clear()
            exp = principal.expires_at.timestamp()
            self._verified[token] = (principal, time.monotonic(), exp)
        return principal

    async def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("malformed token") from None
        if header.get("alg") != ALGORITHM:
            raise _invalid(f"token algorithm must be {ALGORITHM}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not 1 <= len(kid) <= 128:
            raise _invalid("token header has no key id (kid)")

        key = await self.get_key(kid)
        now = self._clock()
        if key is None or (key.revoked_at is not None and key.revoked_at.timestamp() <= now):
            raise Unauthenticated("API_KEY_UNKNOWN", "unknown or revoked API key")

        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.secret,
                algorithms=[ALGORITHM],
                issuer=kid,
                # Time claims are checked below against our own clock, with our reasons.
                options={
                    "require": _REQUIRED_CLAIMS,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise _invalid("token signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(f"token lacks claim {exc.claim!r}") from None
        except jwt.InvalidIssuerError:
            raise _invalid("claim 'iss' must equal the key id") from None
        except jwt.PyJWTError:
            raise _invalid("malformed token") from None

        exp = _number(claims, "exp")
        nbf = _number(claims, "nbf")
        iat = _number(claims, "iat")
        # Same boundary as PyJWT: expired once now >= exp + leeway.
        if now >= exp + self.leeway:
            raise Unauthenticated("TOKEN_EXPIRED", "token expired")
        if nbf > now + self.leeway or iat > now + self.leeway:
            raise Unauthenticated("TOKEN_NOT_YET_VALID", "token not valid yet")

        ident = _parse_identity(claims)
        if ident.tenant != _norm_id(key.tenant_id):
            raise _invalid("token tenant does not own its signing key")
        return Principal(
            tenant_id=ident.tenant,
            subject=ident.sub,
            name=ident.name,
            role=ident.role,
            session_id=ident.session,
            capabilities=ident.caps,
            key_id=kid,
            token_id=ident.jti,
            expires_at=datetime.fromtimestamp(exp, UTC),
            guest=ident.role == "guest",
        )


class StaticKeyStore(KeyStore):
    """A KeyStore over a fixed set of keys (unit tests, tools); no database."""

    def __init__(
        self,
        keys: Iterable[ApiKey],
        *,
        leeway_seconds: float = 60,
        cache_ttl: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(None, leeway_seconds=leeway_seconds, cache_ttl=cache_ttl, clock=clock)
        self.keys = {k.key_id: k for k in keys}
        self.negative_cache_ttl = cache_ttl

    async def _fetch(self, key_id: str) -> ApiKey | None:
        return self.keys.get(key_id)


# ------------------------------------------------------------------ per-RPC principal

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "classmesh_principal", default=None
)


def set_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    return _principal.set(principal)


def reset_principal(token: contextvars.Token[Principal | None]) -> None:
    _principal.reset(token)


def optional_principal() -> Principal | None:
    return _principal.get()


def current_principal() -> Principal:
    """The verified caller of the RPC being served."""
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated("TOKEN_MISSING", "this call needs an access token")
    return principal


def require(
    principal: Principal,
    *,
    session_id: str | None = None,
    roles: Collection[str] | None = None,
    capability: str | None = None,
) -> None:
    """Raise PermissionDenied(PERMISSION_MISSING) unless the grants cover the request.

    The error's metadata names what was missing: `requiredSession`, `requiredRoles`
    (comma-separated), `requiredCapability`.
    """
    missing: dict[str, str] = {}
    if session_id is not None and not principal.has_session(session_id):
        missing["requiredSession"] = session_id
    if roles is not None and principal.role != "admin" and principal.role not in roles:
        missing["requiredRoles"] = ",".join(sorted(roles))
    if capability is not None and not principal.can(capability):
        missing["requiredCapability"] = capability
    if missing:
        what = ", ".join(f"{k.removeprefix('required').lower()} {v}" for k, v in missing.items())
        raise PermissionDenied("PERMISSION_MISSING", f"token lacks {what}", metadata=missing)
