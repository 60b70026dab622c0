"""Exceptions raised by the SDK, rebuilt from the server's `google.rpc.Status`.

ClassMeshError                 any failed call (code, message, reason, domain, metadata)
├── InvalidArgumentError       INVALID_ARGUMENT (field_violations from BadRequest)
├── NotFoundError              NOT_FOUND
├── AlreadyExistsError         ALREADY_EXISTS (e.g. IDEMPOTENCY_KEY_REUSED)
├── AbortedError               ABORTED
├── FailedPreconditionError    FAILED_PRECONDITION (TOO_EARLY, SESSION_ENDED, ...)
├── PermissionDeniedError      PERMISSION_DENIED
├── UnauthenticatedError       UNAUTHENTICATED
├── ResourceExhaustedError     RESOURCE_EXHAUSTED (retry_after from RetryInfo)
├── UnavailableError           UNAVAILABLE (retry_after from RetryInfo)
├── DeadlineExceededError      DEADLINE_EXCEEDED
├── UnimplementedError         UNIMPLEMENTED
└── InternalError              INTERNAL / UNKNOWN / anything else
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "ClassMeshError",
    "InvalidArgumentError",
    "NotFoundError",
    "AlreadyExistsError",
    "AbortedError",
    "FailedPreconditionError",
    "PermissionDeniedError",
    "UnauthenticatedError",
    "ResourceExhaustedError",
    "UnavailableError",
    "DeadlineExceededError",
    "UnimplementedError",
    "InternalError",
    "from_rpc_error",
]

_STATUS_KEY = "grpc-status-details-bin"


class ClassMeshError(Exception):
    """A call failed. `reason` is the server's `ErrorInfo.reason` (e.g. `SESSION_FULL`)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
        correlation_id: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations or [])
        self.retry_after = retry_after
        self.correlation_id = correlation_id


class InvalidArgumentError(ClassMeshError):
    """The request was malformed; see `field_violations`."""


class NotFoundError(ClassMeshError):
    """The resource does not exist (or is not visible to this tenant)."""


class AlreadyExistsError(ClassMeshError):
    """The resource exists, or the request_id was used for a different request."""


class AbortedError(ClassMeshError):
    """A concurrent change won; re-read and retry."""


class FailedPreconditionError(ClassMeshError):
    """Not allowed in the current state (too early, ended, last instructor, ...)."""


class PermissionDeniedError(ClassMeshError):
    """The token is valid but lacks the grant for this call."""


class UnauthenticatedError(ClassMeshError):
    """Missing, expired or invalid access token."""


class ResourceExhaustedError(ClassMeshError):
    """A capacity or rate limit; wait `retry_after` seconds."""


class UnavailableError(ClassMeshError):
    """The service is temporarily unavailable; retry after `retry_after` seconds."""


class DeadlineExceededError(ClassMeshError):
    """The call's deadline passed."""


class UnimplementedError(ClassMeshError):
    """The server does not implement this RPC (see the README status table)."""


class InternalError(ClassMeshError):
    """A server fault; `correlation_id` finds it in the server log."""


_BY_CODE: dict[grpc.StatusCode, type[ClassMeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}


def from_rpc_error(err: grpc.aio.AioRpcError) -> ClassMeshError:
    """Translate a failed call into the typed exception, reading its status details."""
    code = err.code()
    message = err.details() or ""
    kwargs: dict[str, object] = {}
    correlation_id = ""
    for key, value in tuple(err.trailing_metadata() or ()):
        if key == _STATUS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            message = status.message or message
            violations: list[tuple[str, str]] = []
            for any_detail in status.details:
                if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    any_detail.Unpack(info)
                    kwargs["reason"] = info.reason
                    kwargs["domain"] = info.domain
                    kwargs["metadata"] = dict(info.metadata)
                elif any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    any_detail.Unpack(bad)
                    violations.extend((v.field, v.description) for v in bad.field_violations)
                elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    any_detail.Unpack(retry)
                    kwargs["retry_after"] = retry.retry_delay.ToTimedelta().total_seconds()
            if violations:
                kwargs["field_violations"] = violations
        elif key == "x-correlation-id" and isinstance(value, str):
            correlation_id = value
    cls = _BY_CODE.get(code, InternalError)
    return cls(code, message, correlation_id=correlation_id, **kwargs)  # type: ignore[arg-type]
