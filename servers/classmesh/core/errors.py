"""The one error mapping: domain exceptions -> gRPC status with `google.rpc.Status` details.

Every error a client sees carries exactly one `ErrorInfo(reason, domain="classmesh.dev",
metadata)` plus the detail types that fit its kind (AIP-193). Services raise these
exceptions; `ErrorInterceptor` (core/interceptors.py) turns whatever escapes a handler into
a status with `from_exception` + `to_status`, so no exception ever reaches grpc as `UNKNOWN`.

    Exception
     └── ClassMeshError              code, reason, message, metadata -> ErrorInfo
          ├── InvalidArgument        INVALID_ARGUMENT    + BadRequest (VALIDATION_FAILED)
          ├── NotFound               NOT_FOUND           + ResourceInfo
          ├── FailedPrecondition     FAILED_PRECONDITION (+ PreconditionFailure)
          ├── AlreadyExists          ALREADY_EXISTS
          ├── Aborted                ABORTED
          ├── PermissionDenied       PERMISSION_DENIED   (PERMISSION_MISSING)
          ├── Unauthenticated        UNAUTHENTICATED     (TOKEN_INVALID, TOKEN_EXPIRED, ...)
          ├── ResourceExhausted      RESOURCE_EXHAUSTED  + RetryInfo (+ QuotaFailure)
          ├── Unavailable            UNAVAILABLE         + RetryInfo
          ├── DeadlineExceeded       DEADLINE_EXCEEDED
          ├── Unimplemented          UNIMPLEMENTED       (NOT_IMPLEMENTED)
          └── Internal               INTERNAL            (correlation id, nothing else)

Foreign exceptions that escape a handler are mapped by `from_exception`:

    IdempotencyKeyReused            -> ALREADY_EXISTS / IDEMPOTENCY_KEY_REUSED
    IdempotencyKeyInProgress        -> ABORTED / IDEMPOTENCY_KEY_IN_PROGRESS
    InvalidRequestId                -> INVALID_ARGUMENT + BadRequest(request_id)
    events.SessionNotFoundError     -> NOT_FOUND
    asyncpg unique violation        -> ALREADY_EXISTS / ALREADY_EXISTS
    asyncpg check/exclusion/FK      -> FAILED_PRECONDITION / CONSTRAINT_VIOLATED
    asyncpg serialization/deadlock  -> ABORTED / CONCURRENT_MODIFICATION (safe to retry)
    TimeoutError, query cancelled   -> DEADLINE_EXCEEDED
    PostgreSQL/Redis connection     -> UNAVAILABLE / BACKEND_UNAVAILABLE + RetryInfo
    NotImplementedError             -> UNIMPLEMENTED / NOT_IMPLEMENTED (generated base servicer)
    grpc.aio.AioRpcError (a peer)   -> rebuilt from its status (see `from_rpc_error`)
    anything else                   -> INTERNAL "internal error; correlation id <id>"

Database messages never reach the client (they quote SQL, values and constraint names);
the interceptor logs them with the correlation id instead.
"""

from __future__ import annotations

import asyncio
import math
import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import asyncpg
import grpc
import redis.exceptions
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from classmesh.core import logs

__all__ = [
    "DOMAIN",
    "Aborted",
    "AlreadyExists",
    "ClassMeshError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "Unimplemented",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Validator",
    "error_info",
    "from_exception",
    "from_rpc_error",
    "from_rpc_status",
    "to_rpc_status",
    "to_status",
]

#: ErrorInfo.domain of every ClassMesh error.
DOMAIN = "classmesh.dev"

# AIP-193: reason is UPPER_SNAKE_CASE, at most 63 characters.
_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,62}$")
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ClassMeshError(Exception):
    """Base of every error a ClassMesh RPC returns on purpose.

    `reason` is the stable machine-readable cause (ErrorInfo.reason) clients branch on;
    `message` is for humans and may change; `metadata` adds facts (ErrorInfo.metadata,
    lowerCamelCase keys, string values).
    """

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = "UNKNOWN"
    default_message: ClassVar[str] = "error"

    def __init__(
        self,
        reason: str | None = None,
        message: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        code: grpc.StatusCode | None = None,
    ) -> None:
        self.code: grpc.StatusCode = code or self.default_code
        self.reason: str = reason or self.default_reason
        if not _REASON.match(self.reason):
            raise ValueError(f"error reason must be UPPER_SNAKE_CASE: {self.reason!r}")
        self.message: str = message or self.default_message
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}
        # Details carried over verbatim from a peer's status (from_rpc_status).
        self._foreign_details: list[any_pb2.Any] = []
        super().__init__(self.message)

    def details(self) -> list[Message]:
        """Detail messages besides ErrorInfo (BadRequest, RetryInfo, ...), in order."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.reason!r}, {self.message!r})"


class InvalidArgument(ClassMeshError):
    """The request is malformed; `field_violations` says which fields and why."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "VALIDATION_FAILED"
    default_message = "invalid argument"

    def __init__(
        self,
        field_violations: Sequence[tuple[str, str]],
        message: str | None = None,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.field_violations: list[tuple[str, str]] = [(f, d) for f, d in field_violations]
        if message is None and self.field_violations:
            message = "; ".join(f"{f}: {d}" for f, d in self.field_violations)
        super().__init__(reason, message, metadata=metadata)

    def details(self) -> list[Message]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.field_violations
                ]
            )
        ]


class NotFound(ClassMeshError):
    """A resource does not exist or belongs to another tenant (never say which)."""

    default_code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"

    def __init__(
        self,
        resource_type: str,
        resource_id: str,
        message: str | None = None,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.resource_type = resource_type
        self.resource_id = resource_id
        md = {"resourceType": resource_type, "resourceId": resource_id, **(metadata or {})}
        super().__init__(reason, message or f"{resource_type} {resource_id} not found", metadata=md)

    def details(self) -> list[Message]:
        return [
            error_details_pb2.ResourceInfo(
                resource_type=self.resource_type,
                resource_name=self.resource_id,
                description=self.message,
            )
        ]


class FailedPrecondition(ClassMeshError):
    """Valid request, wrong state: SESSION_ENDED, TOO_EARLY, LAST_INSTRUCTOR, SESSION_FULL...

    `violations` are (type, subject, description) triples for PreconditionFailure.
    """

    default_code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"
    default_message = "failed precondition"

    def __init__(
        self,
        reason: str | None = None,
        message: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[tuple[str, str, str]] = (),
    ) -> None:
        self.violations = list(violations)
        super().__init__(reason, message, metadata=metadata)

    def details(self) -> list[Message]:
        if not self.violations:
            return []
        return [
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=t, subject=s, description=d
                    )
                    for t, s, d in self.violations
                ]
            )
        ]


class AlreadyExists(ClassMeshError):
    default_code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"
    default_message = "already exists"


class Aborted(ClassMeshError):
    """A concurrency conflict; the client may retry the whole read-modify-write."""

    default_code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"
    default_message = "aborted by a concurrent change; retry"


class PermissionDenied(ClassMeshError):
    default_code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_MISSING"
    default_message = "permission denied"


class Unauthenticated(ClassMeshError):
    default_code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "TOKEN_INVALID"
    default_message = "missing or invalid access token"


class _Retryable(ClassMeshError):
    """An error that tells the client when to come back (RetryInfo)."""

    def __init__(
        self,
        reason: str | None = None,
        retry_after: float = 1.0,
        message: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.retry_after = max(0.0, float(retry_after))
        super().__init__(reason, message, metadata=metadata)

    def details(self) -> list[Message]:
        delay = duration_pb2.Duration()
        # Round up: retrying a millisecond early only earns another rejection.
        delay.FromMilliseconds(math.ceil(self.retry_after * 1000))
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class ResourceExhausted(_Retryable):
    """Rate limit or capacity; `quota_violations` are (subject, description) pairs."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"
    default_message = "resource exhausted; retry later"

    def __init__(
        self,
        reason: str | None = None,
        retry_after: float = 1.0,
        message: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        quota_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.quota_violations = list(quota_violations)
        super().__init__(reason, retry_after, message, metadata=metadata)

    def details(self) -> list[Message]:
        out = super().details()
        if self.quota_violations:
            out.append(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=s, description=d)
                        for s, d in self.quota_violations
                    ]
                )
            )
        return out


class Unavailable(_Retryable):
    default_code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"
    default_message = "service temporarily unavailable; retry later"


class DeadlineExceeded(ClassMeshError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"
    default_message = "deadline exceeded"


class Unimplemented(ClassMeshError):
    """The RPC exists in the API but this deployment does not implement it yet (the README
    status table lists which)."""

    default_code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "NOT_IMPLEMENTED"
    default_message = "this RPC is not implemented yet; see the README status table"


class Internal(ClassMeshError):
    """A bug or an unexpected failure. The client sees only the correlation id; the log
    line with the same id has the traceback."""

    default_code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self, correlation_id: str | None = None) -> None:
        self.correlation_id = correlation_id or logs.correlation_id() or logs.new_correlation_id()
        super().__init__(
            "INTERNAL",
            f"internal error; correlation id {self.correlation_id}",
            metadata={"correlationId": self.correlation_id},
        )


# --------------------------------------------------------------------------- to the wire


def error_info(err: ClassMeshError) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)


def to_rpc_status(err: ClassMeshError) -> status_pb2.Status:
    """The `google.rpc.Status` of an error: ErrorInfo first, then its other details."""
    packed: list[any_pb2.Any] = []
    for msg in [error_info(err), *err.details()]:
        a = any_pb2.Any()
        a.Pack(msg)
        packed.append(a)
    packed.extend(err._foreign_details)
    return status_pb2.Status(code=err.code.value[0], message=err.message, details=packed)


@dataclass(frozen=True)
class _WireStatus(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def to_status(
    err: ClassMeshError, *, trailing_metadata: Sequence[tuple[str, str | bytes]] = ()
) -> grpc.Status:
    """The `grpc.Status` to pass to `context.abort_with_status`.

    `trailing_metadata` is sent alongside the status details (abort replaces whatever
    trailing metadata the handler set, so e.g. the correlation id must be passed here).
    """
    status: grpc.Status = rpc_status.to_status(to_rpc_status(err))
    if not trailing_metadata:
        return status
    return _WireStatus(status.code, status.details, (*trailing_metadata, *status.trailing_metadata))


# ------------------------------------------------------------------------ from the wire

_CODE_CLASSES: dict[grpc.StatusCode, type[ClassMeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
}
_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def from_rpc_status(status: status_pb2.Status) -> ClassMeshError:
    """Rebuild an error from a `google.rpc.Status` (as GAPIC clients do).

    The result is a plain `ClassMeshError` with the status' code, ErrorInfo reason and
    metadata; every other detail is kept verbatim so re-raising it forwards them unchanged.
    """
    code = _BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    reason, metadata = code.name, {}
    others: list[any_pb2.Any] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        else:
            others.append(detail)
    if not _REASON.match(reason):
        reason = code.name
    err = ClassMeshError(reason, status.message or code.name.lower(), metadata=metadata, code=code)
    err._foreign_details = others
    return err


def _status_of_call(exc: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in exc.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return status_pb2.Status(code=exc.code().value[0], message=exc.details() or "")


# Codes a peer may return that our caller can act on the same way. A peer's
# UNAUTHENTICATED/PERMISSION_DENIED is about *our* credentials, and its INTERNAL/UNKNOWN is
# its bug: both are our internal failure, not the caller's.
_FORWARDED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.CANCELLED,
    }
)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> ClassMeshError:
    """Map a failed call to another ClassMesh service (service-to-service via stubs)."""
    if exc.code() in _FORWARDED:
        return from_rpc_status(_status_of_call(exc))
    return Internal()


# ------------------------------------------------------------------ foreign exceptions

_DB_RETRY_AFTER = 1.0


def _idempotency_errors() -> tuple[type[BaseException], type[BaseException], type[BaseException]]:
    # Imported lazily: core.idempotency may one day raise errors from this module.
    from classmesh.core.idempotency import (
        IdempotencyKeyInProgress,
        IdempotencyKeyReused,
        InvalidRequestId,
    )

    return IdempotencyKeyReused, IdempotencyKeyInProgress, InvalidRequestId


def _session_not_found() -> type[BaseException]:
    from classmesh.core.events import SessionNotFoundError

    return SessionNotFoundError


def from_exception(exc: BaseException) -> ClassMeshError:
    """The ClassMesh error for any exception that escaped a handler (never raises)."""
    if isinstance(exc, ClassMeshError):
        return exc
    if isinstance(exc, NotImplementedError):
        # The generated base servicer raises it for every RPC a service does not override.
        return Unimplemented()
    reused, in_progress, bad_request_id = _idempotency_errors()
    if isinstance(exc, reused):
        return AlreadyExists(
            "IDEMPOTENCY_KEY_REUSED",
            "request_id was already used with different parameters",
        )
    if isinstance(exc, in_progress):
        return Aborted("IDEMPOTENCY_KEY_IN_PROGRESS", "request_id is still being processed")
    if isinstance(exc, bad_request_id):
        return InvalidArgument([("request_id", "must be 1-128 characters")])
    if isinstance(exc, _session_not_found()):
        session_id = str(exc.args[0]) if exc.args else ""
        return NotFound("session", session_id)
    if isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        return AlreadyExists("ALREADY_EXISTS", "a resource with these values already exists")
    if isinstance(
        exc,
        asyncpg.exceptions.CheckViolationError
        | asyncpg.exceptions.ExclusionViolationError
        | asyncpg.exceptions.ForeignKeyViolationError,
    ):
        return FailedPrecondition(
            "CONSTRAINT_VIOLATED", "the change conflicts with the current state"
        )
    if isinstance(
        exc,
        asyncpg.exceptions.SerializationError | asyncpg.exceptions.DeadlockDetectedError,
    ):
        return Aborted("CONCURRENT_MODIFICATION")
    # Before the connection checks: TimeoutError is an OSError.
    if isinstance(exc, asyncio.TimeoutError | asyncpg.exceptions.QueryCanceledError):
        return DeadlineExceeded()
    if isinstance(
        exc,
        asyncpg.exceptions.PostgresConnectionError
        | asyncpg.exceptions.CannotConnectNowError
        | asyncpg.exceptions.TooManyConnectionsError
        | asyncpg.exceptions.AdminShutdownError
        | asyncpg.exceptions.CrashShutdownError
        | redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError
        | ConnectionError,
    ):
        return Unavailable("BACKEND_UNAVAILABLE", _DB_RETRY_AFTER)
    if isinstance(exc, grpc.aio.AioRpcError):
        return from_rpc_error(exc)
    return Internal()


# ------------------------------------------------------------------------- validation

_N = TypeVar("_N", int, float)
_T = TypeVar("_T")


class Validator:
    """Collects field violations so one INVALID_ARGUMENT names every bad field at once.

        v = Validator()
        sid = v.require_uuid("session_id", req.session_id)
        v.require_range("capacity", req.capacity, 1, 1000)
        v.raise_if_any()        # before touching the database

    Each `require_*` returns the (normalised) value, meaningful only once `raise_if_any`
    passed.
    """

    def __init__(self) -> None:
        self.violations: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.violations.append((field, description))

    def require_uuid(self, field: str, value: str | None) -> str:
        if not value:
            self.add(field, "is required")
            return ""
        try:
            return str(uuid.UUID(value))
        except (ValueError, TypeError, AttributeError):
            self.add(field, "must be a UUID")
            return value

    def require_len(self, field: str, value: str | None, lo: int, hi: int) -> str:
        text = value or ""
        if not lo <= len(text) <= hi:
            if lo > 0 and not text:
                self.add(field, "is required")
            else:
                self.add(field, f"length must be between {lo} and {hi} characters")
        return text

    def require_range(self, field: str, value: _N, lo: _N, hi: _N) -> _N:
        if isinstance(value, float) and math.isnan(value) or not lo <= value <= hi:
            self.add(field, f"must be between {lo} and {hi}")
        return value

    def require_enum(self, field: str, value: _T, allowed: Collection[_T]) -> _T:
        if value not in allowed:
            shown = ", ".join(sorted(str(a) for a in allowed))
            self.add(field, f"must be one of: {shown}")
        return value

    def check(self, condition: bool, field: str, description: str) -> bool:
        """Record a violation unless `condition` holds; returns `condition`."""
        if not condition:
            self.add(field, description)
        return condition

    def raise_if_any(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)
