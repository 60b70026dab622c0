"""ClassMesh Python SDK: typed async clients, access tokens, typed errors.

Public names are re-exported here from private modules; `__all__` is the surface.
"""

from classmesh_sdk._base import DEFAULT
from classmesh_sdk._classroom import Classroom, ClassroomEvent
from classmesh_sdk._client import ClassMeshClient
from classmesh_sdk._errors import (
    AbortedError,
    AlreadyExistsError,
    ClassMeshError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from classmesh_sdk._media import MediaSession
from classmesh_sdk._retry import NO_RETRY, Retry
from classmesh_sdk._token import AccessToken
from classmesh_sdk._webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "DEFAULT",
    "NO_RETRY",
    "AbortedError",
    "AccessToken",
    "AlreadyExistsError",
    "ClassMeshClient",
    "ClassMeshError",
    "Classroom",
    "ClassroomEvent",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "MediaSession",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "Retry",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "WebhookVerificationError",
    "verify_webhook",
]
