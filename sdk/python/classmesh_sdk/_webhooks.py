"""Verify ClassMesh webhook deliveries in a partner backend.

A delivery is an HTTP POST whose body is a `classmesh.events.v1.Event` as protobuf JSON,
with `classmesh-signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` computed with the
webhook's secret (returned once by `CreateWebhook`) over `"<t>.<raw body>"`:

    from classmesh_sdk import WebhookVerificationError, verify_webhook

    try:
        event = verify_webhook(raw_body, request.headers, secret)
    except WebhookVerificationError as exc:
        return 400, exc.reason
    # dedupe on request.headers["classmesh-event-id"]: a retried delivery repeats it

Pass the body bytes exactly as received (before any JSON parsing).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping

from google.protobuf import json_format

from classmesh.events.v1 import events_pb2

__all__ = [
    "EVENT_ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WebhookVerificationError",
    "verify_webhook",
]

SIGNATURE_HEADER = "classmesh-signature"
TIMESTAMP_HEADER = "classmesh-timestamp"
EVENT_ID_HEADER = "classmesh-event-id"


class WebhookVerificationError(ValueError):
    """The delivery is not authentic or not fresh; answer it with 400 and drop it.

    `reason`: MISSING_SIGNATURE, MALFORMED_SIGNATURE, TIMESTAMP_OUT_OF_TOLERANCE,
    SIGNATURE_MISMATCH or INVALID_BODY.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    for key, val in headers.items():  # plain dicts are case-sensitive; HTTP is not
        if key.lower() == name:
            return val
    return None


def verify_webhook(
    body: bytes | str,
    headers: Mapping[str, str],
    secret: str,
    tolerance: float = 300,
    *,
    now: float | None = None,
) -> events_pb2.Event:
    """Check the signature and freshness of one delivery; return its typed event.

    `tolerance` is the largest difference in seconds between the signed timestamp and
    `now` (default: the current time), against replayed deliveries; 0 or less disables the
    check. Every `v1=` entry of the header is tried (secret rotation may list several).
    """
    raw = body.encode() if isinstance(body, str) else bytes(body)
    header = _header(headers, SIGNATURE_HEADER)
    if not header:
        raise WebhookVerificationError("MISSING_SIGNATURE", f"no {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                timestamp = None
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise WebhookVerificationError(
            "MALFORMED_SIGNATURE", "expected t=<unix seconds>,v1=<hex digest>"
        )
    current = time.time() if now is None else now
    if tolerance > 0 and abs(current - timestamp) > tolerance:
        raise WebhookVerificationError(
            "TIMESTAMP_OUT_OF_TOLERANCE",
            f"signed at {timestamp}, {abs(current - timestamp):.0f} s from now "
            f"(tolerance {tolerance:g} s)",
        )
    expected = hmac.new(
        secret.encode(), str(timestamp).encode() + b"." + raw, hashlib.sha256
    ).hexdigest()
    if not any(hmac.compare_digest(expected, c) for c in candidates):
        raise WebhookVerificationError(
            "SIGNATURE_MISMATCH", "the signature does not match the body and secret"
        )
    event = events_pb2.Event()
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("the body is not a JSON object")
        json_format.ParseDict(data, event, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise WebhookVerificationError("INVALID_BODY", f"not an Event: {exc}") from exc
    return event
