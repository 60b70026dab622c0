"""grpc.aio server interceptors: telemetry, error mapping, authentication, rate limiting.

Install them in this order (the first is the outermost)::

    grpc.aio.server(interceptors=[
        TelemetryInterceptor(),                              # correlation id, access log line
        ErrorInterceptor(),                                  # any exception -> rich status
        AuthInterceptor(key_store),                          # token -> principal contextvar
        RateLimitInterceptor(limiter, rate_per_minute, burst),
    ])

Why this order: Auth and RateLimit *raise* `ClassMeshError`s, so they must sit inside
Error, which is the only place that turns exceptions into statuses; Error sits inside
Telemetry so the access line sees the final code and the correlation id is set before an
`INTERNAL` quotes it; RateLimit needs Auth's principal to key its bucket.

grpc.aio interceptors only see `HandlerCallDetails` before the handler runs. To act on what
the handler does (its exceptions, its latency, every message of a stream) each interceptor
here wraps the handler's *behaviour* with `wrap_handler`, the one shared utility that covers
all four kinds (unary-unary, unary-stream, stream-unary, stream-stream). An interceptor only
supplies `scope(call)`: an async context manager entered before the behaviour runs and left
after its last response, with the behaviour's exception (even one raised mid-stream) thrown
into it.

Context variables (correlation id, principal, log fields) are set without being reset:
grpc.aio runs each RPC in its own task, so they die with the RPC, and resetting them from an
async generator closed by the event loop can fail ("created in a different Context").
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import redis.exceptions

from classmesh.core import auth, logs
from classmesh.core.errors import (
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    from_exception,
    to_status,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    from classmesh.core.auth import KeyStore

    # grpc's classes are generic only in the stubs, so these aliases exist for mypy alone.
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Scope: TypeAlias = Callable[["RpcCall"], AbstractAsyncContextManager[None]]

__all__ = [
    "DEFAULT_PUBLIC_PREFIXES",
    "AuthInterceptor",
    "ErrorInterceptor",
    "RateLimitInterceptor",
    "RpcCall",
    "ScopedInterceptor",
    "TelemetryInterceptor",
    "wrap_handler",
]

log = logging.getLogger("classmesh.rpc")


#: Methods anyone may call without a token: health checks (load balancers) and reflection.
DEFAULT_PUBLIC_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


@dataclass(frozen=True)
class RpcCall:
    """What a scope knows about the RPC it wraps."""

    method: str
    metadata: tuple[tuple[str, str | bytes], ...]
    context: Context

    def header(self, key: str) -> str | None:
        for k, v in self.metadata:
            if k == key:
                return v.decode("latin-1") if isinstance(v, bytes) else v
        return None


def wrap_handler(handler: Handler, method: str, scope: Scope) -> Handler:
    """A handler whose behaviour runs inside `scope(call)`, for all four RPC kinds."""

    def call_of(context: Context) -> RpcCall:
        metadata = tuple((m[0], m[1]) for m in (context.invocation_metadata() or ()))
        return RpcCall(method=method, metadata=metadata, context=context)

    def unary_response(inner: Callable[..., Any]) -> Callable[[Any, Context], Awaitable[Any]]:
        async def behaviour(request: Any, context: Context) -> Any:
            async with scope(call_of(context)):
                return await inner(request, context)

        return behaviour

    def stream_response(inner: Callable[..., Any]) -> Callable[[Any, Context], Any]:
        if not inspect.isasyncgenfunction(inner):
            # A streaming handler that writes with `context.write()` and returns None.
            async def writer(request: Any, context: Context) -> None:
                async with scope(call_of(context)):
                    result = inner(request, context)
                    if inspect.isawaitable(result):
                        await result

            return writer

        async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
            async with scope(call_of(context)):
                # aclosing: a client that goes away closes the handler's generator too.
                async with aclosing(inner(request, context)) as responses:
                    async for response in responses:
                        yield response

        return generator

    return _rebuild(
        handler,
        lambda kind, inner: (
            unary_response(inner) if kind.endswith("unary") else stream_response(inner)
        ),
    )


#: The four RPC kinds: the handler attribute that holds the behaviour, and its constructor.
_KINDS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def _rebuild(
    handler: Handler,
    wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]],
    deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """`handler` with its behaviour replaced by `wrap(kind, behaviour)` and, if given, its
    request deserializer; the one place that knows the four RPC kinds."""
    for kind, make in _KINDS:
        inner = getattr(handler, kind)
        if inner is not None:
            rebuilt: Handler = make(
                wrap(kind, inner),
                deserializer or handler.request_deserializer,
                handler.response_serializer,
            )
            return rebuilt
    return handler


class MalformedRequest:
    """Stands in for a request whose bytes did not parse as the method's message.

    grpcio answers a deserializer's exception with UNKNOWN before any interceptor runs, so
    `guard_requests` makes the deserializer return this instead and the behaviour raise a
    clear INVALID_ARGUMENT inside the error scope.
    """

    __slots__ = ("detail",)

    def __init__(self, detail: str) -> None:
        self.detail = detail


def _check_request(request: Any) -> Any:
    if isinstance(request, MalformedRequest):
        raise InvalidArgument(
            [("request", f"is not a valid protobuf message of this method: {request.detail}")]
        )
    return request


def guard_requests(handler: Handler) -> Handler:
    """`handler` with a deserializer that never raises: bad bytes become INVALID_ARGUMENT."""
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler

    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            return MalformedRequest(f"{type(exc).__name__}: {exc}"[:200])

    def unary_request(inner: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(inner):

            async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
                _check_request(request)
                async with aclosing(inner(request, context)) as responses:
                    async for response in responses:
                        yield response

            return generator

        async def behaviour(request: Any, context: Context) -> Any:
            result = inner(_check_request(request), context)
            return await result if inspect.isawaitable(result) else result

        return behaviour

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            yield _check_request(request)

    def stream_request(inner: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(inner):

            async def generator(requests: Any, context: Context) -> AsyncIterator[Any]:
                async with aclosing(inner(checked(requests), context)) as responses:
                    async for response in responses:
                        yield response

            return generator

        async def behaviour(requests: Any, context: Context) -> Any:
            result = inner(checked(requests), context)
            return await result if inspect.isawaitable(result) else result

        return behaviour

    return _rebuild(
        handler,
        lambda kind, inner: (
            unary_request(inner) if kind.startswith("unary") else stream_request(inner)
        ),
        safe,
    )


class ScopedInterceptor(grpc.aio.ServerInterceptor, abc.ABC):
    """An interceptor defined by an async context manager around the handler's behaviour."""

    @abc.abstractmethod
    def scope(self, call: RpcCall) -> AbstractAsyncContextManager[None]: ...

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return None
        return wrap_handler(handler, handler_call_details.method, self.scope)


def _code_of(context: Context) -> grpc.StatusCode | None:
    try:
        code: object = context.code()
    except (AttributeError, NotImplementedError):
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # the Cython context reports the raw number
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c
    return None


_CORRELATION_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
_SEVERE = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})
_DEGRADED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class TelemetryInterceptor(ScopedInterceptor):
    """Correlation id (from `x-correlation-id` or new) in a contextvar and in the trailing
    metadata; one JSON access line per RPC (method, code, latency_ms, tenant, subject,
    session, correlation_id, peer)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or log

    @asynccontextmanager
    async def scope(self, call: RpcCall) -> AsyncIterator[None]:
        supplied = call.header(logs.CORRELATION_ID_HEADER)
        # A caller-supplied id is echoed into logs: accept only a tame shape.
        cid = supplied if supplied and _CORRELATION_ID.match(supplied) else None
        cid = cid or logs.new_correlation_id()
        logs.set_correlation_id(cid)
        fields = logs.RpcLogFields()
        logs.set_rpc_log_fields(fields)
        # Set up front so a handler's own abort() keeps it; re-merged on success below.
        call.context.set_trailing_metadata(((logs.CORRELATION_ID_HEADER, cid),))
        started = time.perf_counter()
        # Read the peer now: once a stream was cancelled and its handler closed, asking the
        # finished call for its peer crashes grpcio's Cython context (a segfault, seen when
        # a client drops a WatchSession stream).
        try:
            peer = call.context.peer()
        except Exception:
            peer = ""
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
        try:
            yield
            code = _code_of(call.context) or grpc.StatusCode.OK
            if code is grpc.StatusCode.OK:
                self._keep_correlation_id(call.context, cid)
        except grpc.aio.AbortError:
            code = _code_of(call.context) or grpc.StatusCode.UNKNOWN
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._access_line(call, code, started, fields, cid, peer)

    @staticmethod
    def _keep_correlation_id(context: Context, cid: str) -> None:
        try:
            current = tuple(context.trailing_metadata() or ())
        except (AttributeError, NotImplementedError):
            current = ()
        if not any(k == logs.CORRELATION_ID_HEADER for k, _ in current):
            context.set_trailing_metadata((*current, (logs.CORRELATION_ID_HEADER, cid)))

    def _access_line(
        self,
        call: RpcCall,
        code: grpc.StatusCode,
        started: float,
        fields: logs.RpcLogFields,
        cid: str,
        peer: str,
    ) -> None:
        level = (
            logging.ERROR
            if code in _SEVERE
            else logging.WARNING
            if code in _DEGRADED
            else logging.INFO
        )
        self._log.log(
            level,
            "rpc",
            extra={
                "method": call.method,
                "code": code.name,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                "tenant": fields.tenant,
                "subject": fields.subject,
                "session": fields.session,
                "correlation_id": cid,
                "peer": peer,
                **fields.extra,
            },
        )


class ErrorInterceptor(ScopedInterceptor):
    """Turns every exception a handler raises (also mid-stream) into a rich status.

    `ClassMeshError`s become their status; foreign exceptions go through
    `errors.from_exception`; unexpected ones become INTERNAL with the correlation id, and
    their traceback is logged with that id (never sent). A handler that aborted itself
    (`grpc.aio.AbortError`) passes through untouched.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("classmesh.errors")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return None
        return wrap_handler(guard_requests(handler), handler_call_details.method, self.scope)

    @asynccontextmanager
    async def scope(self, call: RpcCall) -> AsyncIterator[None]:
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            err = from_exception(exc)
            if isinstance(err, Internal):
                cid: str | None = err.correlation_id
                self._log.error(
                    "unhandled exception",
                    exc_info=exc,
                    extra={"method": call.method, "correlation_id": cid},
                )
            else:
                cid = logs.correlation_id()
                if err is not exc:
                    # Server-side only: the foreign message may quote SQL or values.
                    self._log.warning(
                        "mapped exception",
                        extra={
                            "method": call.method,
                            "exception": f"{type(exc).__module__}.{type(exc).__qualname__}",
                            "detail": str(exc),
                            "mapped_code": err.code.name,
                            "mapped_reason": err.reason,
                        },
                    )
            trailing = ((logs.CORRELATION_ID_HEADER, cid),) if cid else ()
            try:
                await call.context.abort_with_status(to_status(err, trailing_metadata=trailing))
            except grpc.aio.UsageError:
                # The handler aborted already and swallowed the AbortError; its status
                # stands.
                raise exc from None


class AuthInterceptor(ScopedInterceptor):
    """Verifies `authorization: Bearer <jwt>` and puts the principal in the context.

    Public methods (health, reflection, plus `public_methods`: full names such as
    `/pkg.Service/Method` or prefixes ending in `/`) run without a token.

    `token_optional_methods` (full names) run without a token too, but a token that is sent
    is verified like anywhere else (a bad one is UNAUTHENTICATED) and its principal set, so
    the handler decides per request whether it needs one (JoinSession: guests through a
    join link come without an account) and rate limits still apply to token holders.
    """

    def __init__(
        self,
        key_store: KeyStore,
        public_methods: Collection[str] = (),
        token_optional_methods: Collection[str] = (),
    ) -> None:
        self._keys = key_store
        self._public_exact = frozenset(m for m in public_methods if not m.endswith("/"))
        self._public_prefixes = DEFAULT_PUBLIC_PREFIXES + tuple(
            m for m in public_methods if m.endswith("/")
        )
        self._optional = frozenset(token_optional_methods)

    def is_public(self, method: str) -> bool:
        return method in self._public_exact or method.startswith(self._public_prefixes)

    @asynccontextmanager
    async def scope(self, call: RpcCall) -> AsyncIterator[None]:
        if self.is_public(call.method):
            yield
            return
        header = call.header("authorization")
        if not header and call.method in self._optional:
            yield
            return
        if not header:
            raise Unauthenticated("TOKEN_MISSING", "this call needs an access token")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("TOKEN_INVALID", "authorization must be 'Bearer <token>'")
        principal = await self._keys.verify(token.strip())
        auth.set_principal(principal)
        fields = logs.rpc_log_fields()
        if fields is not None:
            fields.tenant = principal.tenant_id
            fields.subject = principal.subject
            if principal.session_id != auth.ANY_SESSION:
                fields.session = principal.session_id
        yield


class _Decision(Protocol):
    @property
    def allowed(self) -> bool: ...
    @property
    def retry_after(self) -> float: ...


class Limiter(Protocol):
    """What RateLimitInterceptor needs of `core.ratelimit.RateLimiter`."""

    async def hit(
        self, key: str, *, rate_per_minute: int, burst: int, cost: int = 1
    ) -> _Decision: ...


class RateLimitInterceptor(ScopedInterceptor):
    """One bucket per tenant + subject + method; over it -> RESOURCE_EXHAUSTED/RATE_LIMITED
    with RetryInfo. `rate_per_minute <= 0` disables it.

    Calls without a principal (public methods) are not limited. If Redis is unreachable the
    call is let through and a warning logged: losing the limiter briefly is better than
    losing the whole API with it.
    """

    def __init__(self, limiter: Limiter, rate_per_minute: int, burst: int) -> None:
        from classmesh.core.ratelimit import rate_limit_key

        self._limiter = limiter
        self._key = rate_limit_key
        self.rate_per_minute = int(rate_per_minute)
        # The limiter needs a bucket of at least one request.
        self.burst = max(1, int(burst))
        self._log = logging.getLogger("classmesh.ratelimit")

    @asynccontextmanager
    async def scope(self, call: RpcCall) -> AsyncIterator[None]:
        principal = auth.optional_principal()
        if self.rate_per_minute > 0 and principal is not None:
            key = self._key(principal.tenant_id, principal.subject, call.method)
            try:
                decision = await self._limiter.hit(
                    key, rate_per_minute=self.rate_per_minute, burst=self.burst
                )
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                self._log.warning(
                    "rate limiter unavailable; allowing call",
                    extra={"method": call.method, "detail": str(exc)},
                )
            else:
                if not decision.allowed:
                    retry_after = max(0.0, float(decision.retry_after))
                    raise ResourceExhausted(
                        "RATE_LIMITED",
                        retry_after,
                        f"rate limit exceeded; retry in {retry_after:.3f} s",
                        metadata={
                            "ratePerMinute": str(self.rate_per_minute),
                            "burst": str(self.burst),
                            "method": call.method,
                        },
                        quota_violations=[
                            (
                                f"{principal.tenant_id}/{principal.subject}",
                                f"{self.rate_per_minute} requests per minute per method",
                            )
                        ],
                    )
        yield
