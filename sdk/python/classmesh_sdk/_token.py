"""Access tokens (JWT, HS256) minted with a tenant API key, LiveKit style.

token = (AccessToken(key_id, secret)
         .with_tenant(tenant_id)
         .with_identity("u-42", "Ada")
         .with_grants(session=session_id, role="student", caps=["subscribe", "chat"])
         .with_ttl(timedelta(hours=1))
         .to_jwt())
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import jwt

__all__ = ["AccessToken", "ROLES", "CAPABILITIES"]

ROLES = ("instructor", "assistant", "student", "guest", "admin")
CAPABILITIES = ("publish", "subscribe", "chat", "moderate", "record", "admin")


class AccessToken:
    """Fluent builder of a ClassMesh access token; every `with_*` returns a new builder."""

    def __init__(self, key_id: str, secret: str) -> None:
        if not key_id or not secret:
            raise ValueError("key_id and secret are required")
        self._key_id = key_id
        self._secret = secret
        self._tenant = ""
        self._sub = ""
        self._name = ""
        self._session = "*"
        self._role = "student"
        self._caps: list[str] = ["subscribe", "chat"]
        self._ttl = timedelta(hours=1)
        self._nbf: int | None = None

    def _copy(self) -> AccessToken:
        other = AccessToken.__new__(AccessToken)
        other.__dict__.update(self.__dict__)
        other._caps = list(self._caps)
        return other

    def with_tenant(self, tenant_id: str) -> AccessToken:
        c = self._copy()
        c._tenant = tenant_id
        return c

    def with_identity(self, user_id: str, name: str = "") -> AccessToken:
        c = self._copy()
        c._sub = user_id
        c._name = name or user_id
        return c

    def with_grants(
        self, *, session: str = "*", role: str = "student", caps: Iterable[str] = ()
    ) -> AccessToken:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        c = self._copy()
        c._session = session
        c._role = role
        c._caps = list(caps)
        return c

    def with_ttl(self, ttl: timedelta) -> AccessToken:
        if ttl.total_seconds() <= 0:
            raise ValueError("ttl must be positive")
        c = self._copy()
        c._ttl = ttl
        return c

    def with_not_before(self, epoch_seconds: int) -> AccessToken:
        c = self._copy()
        c._nbf = epoch_seconds
        return c

    def claims(self) -> dict[str, Any]:
        if not self._tenant or not self._sub:
            raise ValueError("with_tenant() and with_identity() are required")
        now = int(time.time())
        return {
            "iss": self._key_id,
            "sub": self._sub,
            "tenant": self._tenant,
            "name": self._name,
            "iat": now,
            "nbf": self._nbf if self._nbf is not None else now,
            "exp": now + int(self._ttl.total_seconds()),
            "jti": secrets.token_hex(12),
            "grants": {"session": self._session, "role": self._role, "caps": self._caps},
        }

    def to_jwt(self) -> str:
        return jwt.encode(
            self.claims(), self._secret, algorithm="HS256", headers={"kid": self._key_id}
        )
