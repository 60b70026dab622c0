"""TURN REST credentials (coturn `use-auth-secret`) and the unconfigured answer."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from classmesh.core.auth import Principal
from classmesh.core.config import Config, load_config
from classmesh.core.errors import FailedPrecondition
from classmesh.media.service import MediaService

SESSION = "00000000-0000-4000-8000-000000000001"


def _principal() -> Principal:
    return Principal(
        tenant_id="t",
        subject="alice",
        name="Alice",
        role="student",
        session_id="*",
        capabilities=frozenset({"publish", "subscribe"}),
        key_id="k",
        token_id="tok",
        expires_at=datetime.now(UTC),
        guest=False,
    )


def _service(cfg: Config) -> MediaService:
    return MediaService(SimpleNamespace(config=cfg))  # type: ignore[arg-type]


def test_turn_credentials_follow_the_coturn_rest_scheme() -> None:
    cfg = replace(
        load_config({}),
        turn_secret="s3cret",
        turn_urls="turn:a:3478, stun:a:3478",
        turn_ttl_seconds=900,
    )
    username, credential, ttl, expiry, urls = _service(cfg).turn_credentials(
        _principal(), SESSION, None, now=1_700_000_000
    )
    assert (username, ttl, expiry) == ("1700000900:alice", 900, 1_700_000_900)
    # Independent reference: coturn's check is base64(HMAC-SHA1(secret, username)).
    expected = base64.b64encode(
        hmac.new(b"s3cret", b"1700000900:alice", hashlib.sha1).digest()
    ).decode()
    assert credential == expected
    assert urls == ["turn:a:3478", "stun:a:3478"]
    _, _, ttl, expiry, _ = _service(cfg).turn_credentials(_principal(), SESSION, 60, now=10)
    assert (ttl, expiry) == (60, 70)


def test_turn_without_secret_is_failed_precondition() -> None:
    cfg = replace(load_config({}), turn_urls="turn:a:3478")
    with pytest.raises(FailedPrecondition) as err:
        _service(cfg).turn_credentials(_principal(), SESSION, None)
    assert "CLASSMESH_TURN_SECRET" in str(err.value)


def test_turn_config_is_read_and_secret_masked() -> None:
    cfg = load_config(
        {
            "CLASSMESH_TURN_URLS": "turn:x:3478",
            "CLASSMESH_TURN_SECRET": "hidden",
            "CLASSMESH_TURN_TTL_SECONDS": "120",
        }
    )
    assert (cfg.turn_urls, cfg.turn_secret, cfg.turn_ttl_seconds) == ("turn:x:3478", "hidden", 120)
    assert "hidden" not in str(cfg.masked())
