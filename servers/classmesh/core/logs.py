"""Structured JSON logs and the per-RPC correlation id.

`configure_logging(level)` makes every log record one JSON object per line on stderr:
`ts`, `level`, `logger`, `msg`, the `extra={...}` fields of the call, and the correlation id
of the RPC being served (if any), so a line written deep inside a service can be joined with
the RPC's access line and with the `INTERNAL` error a client saw.

The correlation id and the per-RPC log fields live in context variables: grpc.aio serves each
RPC in its own asyncio task, so values set by the interceptors are visible to the handler and
to everything it awaits, and never leak into another RPC.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = [
    "CORRELATION_ID_HEADER",
    "JsonFormatter",
    "RpcLogFields",
    "configure_logging",
    "correlation_id",
    "new_correlation_id",
    "reset_correlation_id",
    "rpc_log_fields",
    "set_correlation_id",
    "set_rpc_log_fields",
]

#: Metadata key (request and trailing) that carries the correlation id.
CORRELATION_ID_HEADER = "x-correlation-id"

_correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "classmesh_correlation_id", default=None
)
_rpc_fields: contextvars.ContextVar[RpcLogFields | None] = contextvars.ContextVar(
    "classmesh_rpc_log_fields", default=None
)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


@dataclass
class RpcLogFields:
    """Mutable per-RPC fields the access line reports.

    Telemetry creates one per RPC; inner interceptors fill it in (Auth knows the tenant and
    subject only after verifying the token, and it runs inside Telemetry).
    """

    tenant: str = ""
    subject: str = ""
    session: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def correlation_id() -> str | None:
    """The correlation id of the RPC being served, or None outside an RPC."""
    return _correlation_id.get()


def set_correlation_id(value: str | None) -> contextvars.Token[str | None]:
    return _correlation_id.set(value)


def reset_correlation_id(token: contextvars.Token[str | None]) -> None:
    _correlation_id.reset(token)


def rpc_log_fields() -> RpcLogFields | None:
    """The access-line fields of the RPC being served (None outside Telemetry)."""
    return _rpc_fields.get()


def set_rpc_log_fields(value: RpcLogFields | None) -> contextvars.Token[RpcLogFields | None]:
    return _rpc_fields.set(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; never raises on odd `extra` values."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        cid = correlation_id()
        if cid is not None:
            out["correlation_id"] = cid
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info))
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


def configure_logging(level: str | int = "INFO", *, stream: TextIO | None = None) -> None:
    """Route the root logger to JSON lines on stderr (or `stream`), replacing its handlers."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
