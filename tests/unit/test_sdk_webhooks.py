"""classmesh_sdk.verify_webhook against the server's signer (classmesh.admin.webhooks.sign)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from classmesh.admin.webhooks import backoff_seconds, event_json, sign
from classmesh.core.events import EventRecord
from classmesh_sdk import WebhookVerificationError, verify_webhook

SECRET = "s" * 43
NOW = 1_700_000_000


def _delivery() -> tuple[bytes, dict[str, str]]:
    record = EventRecord(
        tenant_id="00000000-0000-0000-0000-000000000001",
        session_id="00000000-0000-0000-0000-000000000002",
        seq=7,
        type="session_started",
        payload={},
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    body = json.dumps(event_json(record), separators=(",", ":")).encode()
    return body, {"Classmesh-Signature": sign(SECRET, NOW, body)}


def test_a_signed_delivery_verifies_and_parses() -> None:
    body, headers = _delivery()
    event = verify_webhook(body, headers, SECRET, now=NOW + 10)
    assert event.seq == 7 and event.HasField("session_started")
    assert event.session_id.endswith("0002")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b, h, s: (b + b" ", h, s), "SIGNATURE_MISMATCH"),
        (lambda b, h, s: (b, h, s + "x"), "SIGNATURE_MISMATCH"),
        (lambda b, h, s: (b, {}, s), "MISSING_SIGNATURE"),
        (lambda b, h, s: (b, {"classmesh-signature": "v1=abc"}, s), "MALFORMED_SIGNATURE"),
        (lambda b, h, s: (b, {"classmesh-signature": "t=x,v1=abc"}, s), "MALFORMED_SIGNATURE"),
        (lambda b, h, s: (b"[]", {"classmesh-signature": sign(s, NOW, b"[]")}, s), "INVALID_BODY"),
        (lambda b, h, s: (b"{", {"classmesh-signature": sign(s, NOW, b"{")}, s), "INVALID_BODY"),
    ],
)
def test_tampered_or_malformed_deliveries_are_rejected(mutate: object, reason: str) -> None:
    body, headers = _delivery()
    b, h, s = mutate(body, headers, SECRET)  # type: ignore[operator]
    with pytest.raises(WebhookVerificationError) as info:
        verify_webhook(b, h, s, now=NOW)
    assert info.value.reason == reason


def test_stale_or_future_timestamps_are_rejected_and_tolerance_is_configurable() -> None:
    body, headers = _delivery()
    for now in (NOW + 301, NOW - 301):
        with pytest.raises(WebhookVerificationError) as info:
            verify_webhook(body, headers, SECRET, now=now)
        assert info.value.reason == "TIMESTAMP_OUT_OF_TOLERANCE"
    assert verify_webhook(body, headers, SECRET, tolerance=600, now=NOW + 500).seq == 7


def test_any_of_several_v1_signatures_may_match() -> None:
    body, headers = _delivery()
    good = headers["Classmesh-Signature"].split("v1=")[1]
    rotated = {"classmesh-signature": f"t={NOW},v1={'0' * 64},v1={good}"}
    assert verify_webhook(body.decode(), rotated, SECRET, now=NOW).seq == 7


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    import random

    rng = random.Random(1)
    for attempt, full in ((1, 10.0), (2, 20.0), (3, 40.0), (12, 3600.0)):
        for _ in range(50):
            delay = backoff_seconds(attempt, 10.0, 3600.0, rng)
            assert full / 2 <= delay <= full
