"""The one error mapping: every kind -> status with exactly one ErrorInfo and its details."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import asyncpg
import grpc
import pytest
import redis.exceptions
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from classmesh.core import errors, logs
from classmesh.core.errors import (
    Aborted,
    AlreadyExists,
    ClassMeshError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Validator,
    from_exception,
    from_rpc_status,
    to_status,
)
from classmesh.core.events import SessionNotFoundError
from classmesh.core.idempotency import (
    IdempotencyKeyInProgress,
    IdempotencyKeyReused,
    InvalidRequestId,
)

DETAILS_KEY = "grpc-status-details-bin"


def decode(status: grpc.Status) -> status_pb2.Status:
    """What a client does with the trailing metadata (rpc_status.from_call, minus the call)."""
    blobs = [v for k, v in status.trailing_metadata if k == DETAILS_KEY]
    assert len(blobs) == 1
    proto = status_pb2.Status.FromString(blobs[0])
    assert proto.code == status.code.value[0]
    assert proto.message == status.details
    return proto


def unpack_all(proto: status_pb2.Status, kind: type[Message]) -> list[Any]:
    out = []
    for any_ in proto.details:
        if any_.Is(kind.DESCRIPTOR):
            msg = kind()
            any_.Unpack(msg)
            out.append(msg)
    return out


def one_error_info(proto: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    infos = unpack_all(proto, error_details_pb2.ErrorInfo)
    assert len(infos) == 1, "exactly one ErrorInfo per error (AIP-193)"
    assert infos[0].domain == "classmesh.dev"
    return infos[0]


CASES: list[tuple[ClassMeshError, grpc.StatusCode, str]] = [
    (
        InvalidArgument([("title", "is required")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    ),
    (NotFound("session", "s-1"), grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    (
        FailedPrecondition("SESSION_ENDED", "ended"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SESSION_ENDED",
    ),
    (AlreadyExists("ALREADY_EXISTS", "dup"), grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS"),
    (Aborted("CONCURRENT_MODIFICATION"), grpc.StatusCode.ABORTED, "CONCURRENT_MODIFICATION"),
    (PermissionDenied(), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING"),
    (Unauthenticated("TOKEN_EXPIRED", "expired"), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED"),
    (ResourceExhausted("SESSION_FULL", 2.0), grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_FULL"),
    (Unavailable("BACKEND_UNAVAILABLE", 1.0), grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE"),
    (DeadlineExceeded(), grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    (Internal("cid-123456"), grpc.StatusCode.INTERNAL, "INTERNAL"),
]


@pytest.mark.parametrize(("err", "code", "reason"), CASES, ids=lambda c: getattr(c, "name", None))
def test_every_kind_maps_to_its_code_with_one_error_info(
    err: ClassMeshError, code: grpc.StatusCode, reason: str
) -> None:
    status = to_status(err)
    assert status.code == code
    proto = decode(status)
    info = one_error_info(proto)
    assert info.reason == reason


def test_error_info_carries_metadata() -> None:
    err = FailedPrecondition("TOO_EARLY", "too early", metadata={"startsAt": "2030-01-01T00:00Z"})
    info = one_error_info(decode(to_status(err)))
    assert dict(info.metadata) == {"startsAt": "2030-01-01T00:00Z"}


def test_bad_request_lists_every_field_violation() -> None:
    err = InvalidArgument([("title", "is required"), ("capacity", "must be between 1 and 1000")])
    proto = decode(to_status(err))
    [bad] = unpack_all(proto, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("title", "is required"),
        ("capacity", "must be between 1 and 1000"),
    ]
    assert "title: is required" in proto.message


def test_resource_exhausted_has_retry_info_rounded_up_and_quota_failure() -> None:
    err = ResourceExhausted("RATE_LIMITED", 1.2345, quota_violations=[("t/u", "5 per minute")])
    proto = decode(to_status(err))
    [retry] = unpack_all(proto, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds == 1
    assert retry.retry_delay.nanos == 235_000_000
    [quota] = unpack_all(proto, error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject == "t/u"


def test_unavailable_has_retry_info() -> None:
    proto = decode(to_status(Unavailable("BACKEND_UNAVAILABLE", 3)))
    [retry] = unpack_all(proto, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds == 3


def test_not_found_has_resource_info() -> None:
    proto = decode(to_status(NotFound("session", "abc")))
    [res] = unpack_all(proto, error_details_pb2.ResourceInfo)
    assert (res.resource_type, res.resource_name) == ("session", "abc")
    assert dict(one_error_info(proto).metadata) == {"resourceType": "session", "resourceId": "abc"}


def test_precondition_failure_only_when_violations_given() -> None:
    plain = decode(to_status(FailedPrecondition("LAST_INSTRUCTOR", "keep one")))
    assert unpack_all(plain, error_details_pb2.PreconditionFailure) == []
    rich = decode(
        to_status(FailedPrecondition("LAST_INSTRUCTOR", "x", violations=[("ROLE", "u1", "last")]))
    )
    [pf] = unpack_all(rich, error_details_pb2.PreconditionFailure)
    assert pf.violations[0].subject == "u1"


def test_internal_message_is_only_the_correlation_id() -> None:
    err = Internal("abcdef123456")
    assert err.message == "internal error; correlation id abcdef123456"
    assert dict(one_error_info(decode(to_status(err))).metadata) == {
        "correlationId": "abcdef123456"
    }


def test_internal_takes_the_correlation_id_of_the_current_rpc() -> None:
    async def inside_rpc() -> str:
        logs.set_correlation_id("rpc-correlation-1")
        return Internal().correlation_id

    assert asyncio.run(inside_rpc()) == "rpc-correlation-1"


def test_to_status_adds_trailing_metadata_next_to_details() -> None:
    status = to_status(PermissionDenied(), trailing_metadata=[("x-correlation-id", "c1")])
    assert ("x-correlation-id", "c1") in status.trailing_metadata
    decode(status)


def test_reason_must_be_upper_snake() -> None:
    with pytest.raises(ValueError):
        FailedPrecondition("session-ended", "x")


def test_rebuilt_from_status_keeps_code_reason_and_details() -> None:
    original = ResourceExhausted("RATE_LIMITED", 2.5, metadata={"method": "/a/B"})
    rebuilt = from_rpc_status(errors.to_rpc_status(original))
    assert rebuilt.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rebuilt.reason == "RATE_LIMITED"
    assert rebuilt.metadata == {"method": "/a/B"}
    again = decode(to_status(rebuilt))
    one_error_info(again)
    [retry] = unpack_all(again, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds == 2


def test_status_is_what_rpc_status_produces() -> None:
    # The anchor's path: rpc_status.to_status(google.rpc.Status).
    proto = errors.to_rpc_status(NotFound("session", "s"))
    assert to_status(NotFound("session", "s")) == rpc_status.to_status(proto)


# ------------------------------------------------------------------ foreign exceptions

SQL = 'duplicate key value violates unique constraint "sessions_pkey" DETAIL: Key (id)=(42)'


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (
            IdempotencyKeyReused("r1", "/a/B", "/a/B"),
            grpc.StatusCode.ALREADY_EXISTS,
            "IDEMPOTENCY_KEY_REUSED",
        ),
        (IdempotencyKeyInProgress("r1"), grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_IN_PROGRESS"),
        (InvalidRequestId("too long"), grpc.StatusCode.INVALID_ARGUMENT, "VALIDATION_FAILED"),
        (SessionNotFoundError("7c0b"), grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        (
            asyncpg.exceptions.UniqueViolationError(SQL),
            grpc.StatusCode.ALREADY_EXISTS,
            "ALREADY_EXISTS",
        ),
        (
            asyncpg.exceptions.CheckViolationError(SQL),
            grpc.StatusCode.FAILED_PRECONDITION,
            "CONSTRAINT_VIOLATED",
        ),
        (
            asyncpg.exceptions.ForeignKeyViolationError(SQL),
            grpc.StatusCode.FAILED_PRECONDITION,
            "CONSTRAINT_VIOLATED",
        ),
        (
            asyncpg.exceptions.SerializationError(SQL),
            grpc.StatusCode.ABORTED,
            "CONCURRENT_MODIFICATION",
        ),
        (asyncio.TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
        (
            asyncpg.exceptions.QueryCanceledError(SQL),
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "DEADLINE_EXCEEDED",
        ),
        (
            asyncpg.exceptions.ConnectionDoesNotExistError(SQL),
            grpc.StatusCode.UNAVAILABLE,
            "BACKEND_UNAVAILABLE",
        ),
        (
            asyncpg.exceptions.CannotConnectNowError(SQL),
            grpc.StatusCode.UNAVAILABLE,
            "BACKEND_UNAVAILABLE",
        ),
        (redis.exceptions.ConnectionError(SQL), grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE"),
        (ConnectionRefusedError(SQL), grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE"),
        (RuntimeError(SQL), grpc.StatusCode.INTERNAL, "INTERNAL"),
        (KeyError(SQL), grpc.StatusCode.INTERNAL, "INTERNAL"),
    ],
    ids=lambda c: type(c).__name__ if isinstance(c, BaseException) else None,
)
def test_foreign_exceptions_map_without_leaking_their_text(
    exc: BaseException, code: grpc.StatusCode, reason: str
) -> None:
    err = from_exception(exc)
    assert (err.code, err.reason) == (code, reason)
    status = to_status(err)
    proto = decode(status)
    one_error_info(proto)
    wire = status.details + proto.SerializeToString().decode("latin-1")
    for secret in ("sessions_pkey", "duplicate key", "Key (id)", "Traceback"):
        assert secret not in wire


def test_unavailable_from_backend_has_retry_info() -> None:
    proto = decode(to_status(from_exception(redis.exceptions.ConnectionError("down"))))
    assert len(unpack_all(proto, error_details_pb2.RetryInfo)) == 1


def test_classmesh_errors_pass_through_unchanged() -> None:
    err = FailedPrecondition("SESSION_FULL", "full")
    assert from_exception(err) is err


def test_internal_from_exception_gets_a_correlation_id() -> None:
    err = from_exception(ValueError("boom"))
    assert isinstance(err, Internal)
    assert len(err.correlation_id) >= 16
    assert err.message == f"internal error; correlation id {err.correlation_id}"


# -------------------------------------------------------------------------- validation


def test_validator_collects_every_violation_then_raises_once() -> None:
    v = Validator()
    v.require_uuid("session_id", "not-a-uuid")
    v.require_len("title", "", 1, 200)
    v.require_len("name", "x" * 5, 1, 4)
    v.require_range("capacity", 0, 1, 1000)
    v.require_range("ratio", math.nan, 0.0, 1.0)
    v.require_enum("kind", "LECTURE", {"CLASS", "STUDY_ROOM"})
    v.check(False, "page_size", "must not be negative")
    with pytest.raises(InvalidArgument) as info:
        v.raise_if_any()
    fields = [f for f, _ in info.value.field_violations]
    assert fields == ["session_id", "title", "name", "capacity", "ratio", "kind", "page_size"]
    assert dict(info.value.field_violations)["title"] == "is required"
    assert "CLASS, STUDY_ROOM" in dict(info.value.field_violations)["kind"]


def test_validator_passes_good_input_and_normalises_uuid() -> None:
    v = Validator()
    sid = v.require_uuid("session_id", "7C0B8A4E-6C43-4D46-9A7A-0F1A2B3C4D5E")
    assert sid == "7c0b8a4e-6c43-4d46-9a7a-0f1a2b3c4d5e"
    assert v.require_len("title", "Algebra", 1, 200) == "Algebra"
    assert v.require_range("capacity", 1000, 1, 1000) == 1000
    assert v.require_enum("kind", "CLASS", {"CLASS"}) == "CLASS"
    v.raise_if_any()
    assert v.violations == []


# ------------------------------------------------------------------------------- logs


def test_json_log_line_has_fields_extra_and_correlation_id() -> None:
    formatter = logs.JsonFormatter()
    record = logging.LogRecord("classmesh.rpc", logging.INFO, __file__, 1, "rpc", None, None)
    record.method = "/a.B/C"
    record.latency_ms = 1.5

    async def inside() -> str:
        logs.set_correlation_id("corr-abcdef12")
        return formatter.format(record)

    line = json.loads(asyncio.run(inside()))
    assert line["msg"] == "rpc"
    assert line["level"] == "INFO"
    assert line["logger"] == "classmesh.rpc"
    assert line["method"] == "/a.B/C"
    assert line["latency_ms"] == 1.5
    assert line["correlation_id"] == "corr-abcdef12"
    assert "ts" in line
