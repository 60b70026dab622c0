"""The SDK's public surface (STYLE rules 8, 9, 13) and its error round trip.

* `classmesh_sdk.__all__` is the curated list, and all of it imports;
* `ClassMeshClient` has one sub-client per service with one snake_case method per RPC of
  that service (read from the generated descriptors), each taking keyword-only `timeout`,
  `metadata` and (but for bidi streams) `retry`, and a MethodInfo that matches the RPC;
* an error the server builds with `classmesh.core.errors.to_status` comes back out of the
  SDK as the typed exception with its reason, domain, metadata, field violations, retry
  delay and correlation id (over a real grpc.aio server on 127.0.0.1:0).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, descriptor_pb2

import classmesh_sdk
from classmesh.admin.v1 import admin_service_pb2
from classmesh.core import errors as server_errors
from classmesh.core.server import SERVICES
from classmesh_sdk import NO_RETRY, ClassMeshClient
from classmesh_sdk._base import MethodInfo, ServiceClient

EXPECTED_ALL = {
    "DEFAULT",
    "NO_RETRY",
    "AbortedError",
    "AccessToken",
    "AlreadyExistsError",
    "Classroom",
    "ClassroomEvent",
    "ClassMeshClient",
    "ClassMeshError",
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
}

#: ClassMeshClient attribute -> service short name (classmesh.<short>.v1).
SUB_CLIENTS = {
    "sessions": "session",
    "media": "media",
    "breakouts": "breakout",
    "interaction": "interaction",
    "recordings": "recording",
    "admin": "admin",
}


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])|(?<=[A-Z])([A-Z])(?=[a-z])", r"_\1\2", name).lower()


def _methods(short: str) -> list[descriptor.MethodDescriptor]:
    module = importlib.import_module(f"classmesh.{short}.v1.{short}_service_pb2")
    service = module.DESCRIPTOR.services_by_name[SERVICES[short].rsplit(".", 1)[1]]
    return list(service.methods)


def _public_methods(obj: object) -> set[str]:
    base = {n for n in dir(ServiceClient) if not n.startswith("_")}
    return {
        n for n in dir(obj) if not n.startswith("_") and n not in base and callable(getattr(obj, n))
    }


# ------------------------------------------------------------------------- __all__


def test_all_is_exactly_the_curated_list() -> None:
    assert set(classmesh_sdk.__all__) == EXPECTED_ALL
    assert len(classmesh_sdk.__all__) == len(EXPECTED_ALL), "duplicates in __all__"


def test_every_exported_name_imports() -> None:
    namespace: dict[str, Any] = {}
    exec("from classmesh_sdk import *", namespace)
    for name in EXPECTED_ALL:
        assert namespace[name] is getattr(classmesh_sdk, name)
    for name in EXPECTED_ALL:
        obj = getattr(classmesh_sdk, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            # Re-exported from a private module, documented where the user meets it.
            assert obj.__module__.startswith("classmesh_sdk._"), (name, obj.__module__)
            assert obj.__doc__, f"{name} has no docstring"


def test_exception_tree() -> None:
    # WebhookVerificationError is no failed call (it checks a received delivery): a ValueError.
    local = {"WebhookVerificationError"}
    errs = [n for n in EXPECTED_ALL if n.endswith("Error") and n not in local | {"ClassMeshError"}]
    assert issubclass(classmesh_sdk.WebhookVerificationError, ValueError)
    for name in errs:
        assert issubclass(getattr(classmesh_sdk, name), classmesh_sdk.ClassMeshError), name
    assert issubclass(classmesh_sdk.ClassMeshError, Exception)


# --------------------------------------------------------------------- sub-clients


async def test_client_has_one_sub_client_per_service() -> None:
    # async: a grpc.aio channel belongs to the running loop (nothing is dialled here).
    assert set(SUB_CLIENTS.values()) == set(SERVICES)
    async with ClassMeshClient("127.0.0.1:1", token="t") as client:
        for attr in SUB_CLIENTS:
            assert isinstance(getattr(client, attr), ServiceClient), attr


@pytest.mark.parametrize("attr", list(SUB_CLIENTS))
async def test_sub_client_has_a_method_per_rpc(attr: str) -> None:
    short = SUB_CLIENTS[attr]
    async with ClassMeshClient("127.0.0.1:1", token="t") as client:
        sub = getattr(client, attr)
    rpcs = {_snake(m.name): m for m in _methods(short)}

    assert _public_methods(sub) == set(rpcs), "methods must map 1:1 to the service's RPCs"

    for name, rpc in rpcs.items():
        fn: Callable[..., Any] = getattr(sub, name)
        params = inspect.signature(fn).parameters
        wanted = {"timeout", "metadata"} | (
            set() if rpc.client_streaming and rpc.server_streaming else {"retry"}
        )
        for kw in wanted:
            assert kw in params, f"{attr}.{name} lacks {kw}="
            assert params[kw].kind is inspect.Parameter.KEYWORD_ONLY, f"{attr}.{name}: {kw}"
        if not rpc.server_streaming and not rpc.client_streaming:
            assert inspect.iscoroutinefunction(fn), f"{attr}.{name} must be async"
        assert fn.__doc__, f"{attr}.{name} has no docstring"


@pytest.mark.parametrize("attr", list(SUB_CLIENTS))
async def test_method_infos_match_the_descriptors(attr: str) -> None:
    short = SUB_CLIENTS[attr]
    async with ClassMeshClient("127.0.0.1:1", token="t") as client:
        cls = type(getattr(client, attr))
    infos = {v.path: v for v in vars(cls).values() if isinstance(v, MethodInfo)}
    no_side_effects = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
    for rpc in _methods(short):
        path = f"/{SERVICES[short]}/{rpc.name}"
        assert path in infos, f"no MethodInfo for {path}"
        info = infos[path]
        assert info.request_type.DESCRIPTOR is rpc.input_type, path
        assert info.response_type.DESCRIPTOR is rpc.output_type, path
        assert info.server_streaming == rpc.server_streaming, path
        assert info.client_streaming == rpc.client_streaming, path
        assert info.read_only == (rpc.GetOptions().idempotency_level == no_side_effects), path
        assert info.has_request_id == ("request_id" in rpc.input_type.fields_by_name), path
        assert info.has_after_seq == ("after_seq" in rpc.input_type.fields_by_name), path
        # STYLE rule 9: a mutation retries on more than UNAVAILABLE only with a request_id.
        if not info.read_only and not info.has_request_id and not info.has_after_seq:
            assert info.default_retry.codes <= {grpc.StatusCode.UNAVAILABLE}, path
    assert len(infos) == len(_methods(short))


# ---------------------------------------------------------------- error round trip

CORRELATION_ID = "cid-sdk-surface-0001"

CASES: dict[str, tuple[server_errors.ClassMeshError, type[classmesh_sdk.ClassMeshError]]] = {
    "invalid": (
        server_errors.InvalidArgument(
            [("page_size", "must be between 0 and 100"), ("page_token", "garbage")],
            metadata={"hint": "x"},
        ),
        classmesh_sdk.InvalidArgumentError,
    ),
    "not_found": (server_errors.NotFound("session", "s-1"), classmesh_sdk.NotFoundError),
    "precondition": (
        server_errors.FailedPrecondition(
            "TOO_EARLY", "starts in 11 min", metadata={"opensAt": "t"}, violations=[("T", "s", "d")]
        ),
        classmesh_sdk.FailedPreconditionError,
    ),
    "exists": (
        server_errors.AlreadyExists("IDEMPOTENCY_KEY_REUSED", "reused"),
        classmesh_sdk.AlreadyExistsError,
    ),
    "aborted": (server_errors.Aborted("CONCURRENT_MODIFICATION"), classmesh_sdk.AbortedError),
    "denied": (server_errors.PermissionDenied(), classmesh_sdk.PermissionDeniedError),
    "unauthenticated": (
        server_errors.Unauthenticated("TOKEN_EXPIRED", "token expired"),
        classmesh_sdk.UnauthenticatedError,
    ),
    "exhausted": (
        server_errors.ResourceExhausted(
            "RATE_LIMITED", 2.5, quota_violations=[("tenant", "too many")]
        ),
        classmesh_sdk.ResourceExhaustedError,
    ),
    "unavailable": (
        server_errors.Unavailable("BACKEND_UNAVAILABLE", 0.25),
        classmesh_sdk.UnavailableError,
    ),
    "deadline": (server_errors.DeadlineExceeded(), classmesh_sdk.DeadlineExceededError),
    "unimplemented": (server_errors.Unimplemented(), classmesh_sdk.UnimplementedError),
    "internal": (server_errors.Internal("corr-internal-1"), classmesh_sdk.InternalError),
}


async def _get_tenant(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    case = dict(context.invocation_metadata() or ()).get("x-case", "")
    if case == "bare":
        # Not built by our mapping: no details at all.
        await context.abort(grpc.StatusCode.UNKNOWN, "boom")
    err, _ = CASES[str(case)]
    trailing = (("x-correlation-id", CORRELATION_ID),)
    await context.abort_with_status(server_errors.to_status(err, trailing_metadata=trailing))


@pytest.fixture(scope="module")
async def error_server() -> AsyncIterator[str]:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICES["admin"],
        {
            "GetTenant": grpc.unary_unary_rpc_method_handler(
                _get_tenant,
                request_deserializer=admin_service_pb2.GetTenantRequest.FromString,
                response_serializer=admin_service_pb2.GetTenantResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.mark.parametrize("case", list(CASES))
async def test_errors_round_trip_into_typed_exceptions(error_server: str, case: str) -> None:
    sent, cls = CASES[case]
    async with ClassMeshClient(error_server, token="t") as client:
        with pytest.raises(classmesh_sdk.ClassMeshError) as info:
            await client.admin.get_tenant(metadata=[("x-case", case)], retry=NO_RETRY, timeout=10)
    err = info.value
    assert type(err) is cls
    assert err.code is sent.code
    assert err.reason == sent.reason
    assert err.domain == "classmesh.dev"
    assert err.metadata == sent.metadata
    assert err.message == sent.message
    assert err.correlation_id == CORRELATION_ID
    assert err.field_violations == getattr(sent, "field_violations", [])
    expected_retry = getattr(sent, "retry_after", None)
    assert err.retry_after == expected_retry


async def test_an_error_without_details_is_internal(error_server: str) -> None:
    async with ClassMeshClient(error_server, token="t") as client:
        with pytest.raises(classmesh_sdk.InternalError) as info:
            await client.admin.get_tenant(metadata=[("x-case", "bare")], retry=NO_RETRY, timeout=10)
    assert info.value.code is grpc.StatusCode.UNKNOWN
    assert info.value.reason == "" and info.value.message == "boom"


async def test_from_rpc_error_on_a_raw_call(error_server: str) -> None:
    """The private mapper itself, on an AioRpcError from a plain stub."""
    from classmesh_sdk._errors import from_rpc_error

    async with grpc.aio.insecure_channel(error_server) as channel:
        call = channel.unary_unary(
            f"/{SERVICES['admin']}/GetTenant",
            request_serializer=admin_service_pb2.GetTenantRequest.SerializeToString,
            response_deserializer=admin_service_pb2.GetTenantResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(admin_service_pb2.GetTenantRequest(), metadata=[("x-case", "exhausted")])
    err = from_rpc_error(info.value)
    assert isinstance(err, classmesh_sdk.ResourceExhaustedError)
    assert (err.reason, err.domain, err.retry_after) == ("RATE_LIMITED", "classmesh.dev", 2.5)
