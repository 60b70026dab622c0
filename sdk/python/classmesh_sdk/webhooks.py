"""Webhook signature verification (`verify_webhook`), also exported by `classmesh_sdk`.

The implementation lives in `classmesh_sdk._webhooks`; see its docstring for the scheme.
"""

from classmesh_sdk._webhooks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookVerificationError,
    verify_webhook,
)

__all__ = [
    "EVENT_ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WebhookVerificationError",
    "verify_webhook",
]
