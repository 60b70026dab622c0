"""The grpc-web gateway: HTTP/1.1 in (aiohttp), raw gRPC out (grpc.aio generic calls).

One request's path is the gRPC method; its one message is forwarded as the bytes it came
as over one pooled channel per upstream (no re-serialisation), and the reply goes back as
grpc-web frames: data frames, then the trailer frame (grpc-status, grpc-message,
grpc-status-details-bin byte-exact, trailing metadata). An error before any message is a
trailers-only response (the status in HTTP headers).

What a client sees for each failure:

    HTTP 200 + grpc-status     every gRPC outcome: upstream errors (details kept), unknown
                               method and client/bidi streams (UNIMPLEMENTED), deadline
    HTTP 400 INVALID_ARGUMENT  malformed frame, truncated frame, bad base64, bad grpc-timeout
                               or metadata header
    HTTP 403 PERMISSION_DENIED an Origin not in the allow-list (preflight: 403, no CORS headers)
    HTTP 413 RESOURCE_EXHAUSTED a body above the size limit (the connection is closed)
    HTTP 415 INVALID_ARGUMENT  a Content-Type that is not grpc-web (binary or text)

Each carries grpc-status, grpc-message and grpc-status-details-bin (a google.rpc.Status with
one ErrorInfo), so every client learns the same reason. Streams are watched by one task:
a stream with no upstream message for `stream_idle_seconds` ends with UNAVAILABLE (the
client resumes with `after_seq`), and a client that has not taken a write for
`slow_client_seconds` is cut with RESOURCE_EXHAUSTED SLOW_CONSUMER: the gateway stops
reading upstream (gRPC flow control pushes back) and never buffers more than the
transport's high-water mark per stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import mimetypes
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from classmesh.core import errors, logs
from classmesh.core.config import Config
from classmesh.gateway.protocol import (
    FrameError,
    WireFormat,
    content_format,
    data_frame,
    decode_request_body,
    encode_grpc_message,
    metadata_from_headers,
    parse_grpc_timeout,
    response_headers,
    trailer_block,
    trailer_frame,
)
from classmesh.gateway.routes import CallKind, Route, RouteTable

__all__ = ["STATIC_DIR", "Gateway", "GatewaySettings", "GatewayStats"]

log = logging.getLogger("classmesh.gateway")

#: Where the classroom page lives; served at `/` when present.
STATIC_DIR = Path(__file__).resolve().parent / "static"

#: Options of the upstream channels (explicit keepalive, same message limits as the server).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]

_EXPOSE = "grpc-status, grpc-message, grpc-status-details-bin, x-correlation-id"
_ALLOW_HEADERS = (
    "content-type, x-grpc-web, x-user-agent, grpc-timeout, authorization, "
    "x-request-id, x-correlation-id"
)
_DETAILS_KEY = "grpc-status-details-bin"
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".wasm": "application/wasm",
    ".txt": "text/plain; charset=utf-8",
}
# Reasons for statuses the gRPC library makes up itself (no details from a server).
_LOCAL_REASONS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    grpc.StatusCode.UNAVAILABLE: "UNAVAILABLE",
    grpc.StatusCode.UNIMPLEMENTED: "NOT_IMPLEMENTED",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",
    grpc.StatusCode.CANCELLED: "UNAVAILABLE",
    grpc.StatusCode.INTERNAL: "INTERNAL",
    grpc.StatusCode.UNKNOWN: "INTERNAL",
}


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway enforces; `from_config` maps the `CLASSMESH_GATEWAY_*` variables."""

    #: Origins allowed to call cross-origin (exact `scheme://host[:port]`; `*` = any).
    #: The gateway's own origin (pages it serves) is always allowed.
    cors_origins: tuple[str, ...] = ()
    #: Largest request message in bytes (grpc-web frame included); above: 413.
    max_request_bytes: int = 4 * 1024 * 1024
    #: A server stream with no upstream message this long ends with UNAVAILABLE.
    stream_idle_seconds: float = 300.0
    #: A client that has not taken a write this long is cut (RESOURCE_EXHAUSTED).
    slow_client_seconds: float = 10.0
    #: Per-stream transport buffer (high-water mark) before writes wait for the client.
    stream_buffer_bytes: int = 256 * 1024
    #: Directory served at `/` (index.html) and below; None serves no files.
    static_dir: Path | None = STATIC_DIR

    @classmethod
    def from_config(cls, cfg: Config) -> GatewaySettings:
        origins = tuple(o.strip().rstrip("/") for o in cfg.gateway_cors_origins.split(","))
        return cls(
            cors_origins=tuple(o for o in origins if o),
            max_request_bytes=cfg.gateway_max_request_bytes,
            stream_idle_seconds=cfg.gateway_stream_idle_seconds,
            slow_client_seconds=cfg.gateway_slow_client_seconds,
            stream_buffer_bytes=cfg.gateway_stream_buffer_bytes,
        )


@dataclass
class GatewayStats:
    """Counters since start (read by tests and benchmarks)."""

    calls: int = 0
    streams_open: int = 0
    rejected: int = 0
    idle_closed: int = 0
    slow_cut: int = 0


@dataclass(slots=True)
class _Method:
    route: Route
    unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] | None
    stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] | None


@dataclass(slots=True, eq=False)
class _Stream:
    task: asyncio.Task[Any]
    last_message: float
    writing_since: float = 0.0
    #: Why the gateway ends this stream ("idle", "slow", "shutdown"); "" = not ending it.
    cut: str = ""


#: (grpc-status, grpc-message, grpc-status-details-bin bytes)
_Status = tuple[int, str, bytes]


class _TooLarge(Exception):
    pass


@dataclass
class _Cors:
    """CORS response headers for an allowed cross-origin caller (None when same-origin)."""

    origin: str
    headers: list[tuple[str, str]] = field(default_factory=list)


class Gateway:
    """grpc-web over HTTP/1.1 in front of the mesh. `start()`, then `stop()`."""

    def __init__(self, settings: GatewaySettings, routes: RouteTable) -> None:
        self.settings = settings
        self.routes = routes
        self.stats = GatewayStats()
        self._origins = frozenset(settings.cors_origins)
        self._any_origin = "*" in self._origins
        self._static = settings.static_dir.resolve() if settings.static_dir else None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._methods: dict[str, _Method] = {}
        self._streams: set[_Stream] = set()
        self._runner: web.ServerRunner | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closing = False
        self.host = ""
        self.port = 0

    # ------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}"

    async def start(self, host: str, port: int) -> None:
        for target in sorted(self.routes.targets):
            self._channels[target] = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        for route in self.routes:
            ch = self._channels[route.target]
            if route.kind is CallKind.UNARY:
                self._methods[route.path] = _Method(route, ch.unary_unary(route.path), None)
            elif route.kind is CallKind.SERVER_STREAM:
                self._methods[route.path] = _Method(route, None, ch.unary_stream(route.path))
            else:
                self._methods[route.path] = _Method(route, None, None)
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        bound = sockets[0].getsockname() if sockets else (host, port)
        self.host = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        self.port = int(bound[1])
        self._watchdog = asyncio.create_task(self._watch(), name="gateway-watchdog")

    async def stop(self) -> None:
        """End open streams (UNAVAILABLE SHUTTING_DOWN), stop listening, close channels."""
        self._closing = True
        for stream in list(self._streams):
            stream.cut = "shutdown"
            stream.task.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._runner is not None:
            await self._runner.cleanup()
        for ch in self._channels.values():
            await ch.close()

    async def _watch(self) -> None:
        s = self.settings
        tick = max(0.05, min(1.0, s.stream_idle_seconds / 4, s.slow_client_seconds / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for stream in self._streams:
                if stream.cut:
                    continue
                if stream.writing_since:
                    if now - stream.writing_since > s.slow_client_seconds:
                        stream.cut = "slow"
                        stream.task.cancel()
                elif now - stream.last_message > s.stream_idle_seconds:
                    stream.cut = "idle"
                    stream.task.cancel()

    # ---------------------------------------------------------------------- routing

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            method = request.method
            if method == "POST":
                return await self._rpc(request)
            if method == "OPTIONS":
                return self._preflight(request)
            if method in ("GET", "HEAD"):
                if request.path == "/healthz":
                    return self._health()
                return self._file(request)
            return web.Response(status=405, headers={"Allow": "GET, HEAD, POST, OPTIONS"})
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            cid = logs.new_correlation_id()
            log.exception("gateway request failed", extra={"correlation_id": cid})
            return self._reject(500, errors.Internal(cid), None, None)

    def _health(self) -> web.Response:
        if self._closing:
            return web.Response(status=503, text="shutting down\n")
        lines, ok = [], True
        for target, ch in self._channels.items():
            state = ch.get_state(try_to_connect=False)
            ok = ok and state not in (
                grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                grpc.ChannelConnectivity.SHUTDOWN,
            )
            lines.append(f"upstream {target}: {state.name.lower()}")
        return web.Response(
            status=200 if ok else 503, text=("ok" if ok else "degraded") + "\n" + "\n".join(lines)
        )

    # -------------------------------------------------------------------------- CORS

    def _cors(self, request: web.BaseRequest) -> _Cors | None | bool:
        """None: no Origin or same-origin; _Cors: allowed; False: not allowed."""
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        host = request.host
        if origin == "http://" + host or origin == "https://" + host:
            return None
        if self._any_origin or origin in self._origins:
            return _Cors(origin, [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")])
        return False

    def _preflight(self, request: web.BaseRequest) -> web.Response:
        cors = self._cors(request)
        if cors is False:
            self.stats.rejected += 1
            return web.Response(status=403, text="origin not allowed\n")
        headers: list[tuple[str, str]] = [("Allow", "POST, OPTIONS")]
        if isinstance(cors, _Cors):
            wanted = request.headers.get("Access-Control-Request-Headers", "")
            names = [h.strip().lower() for h in wanted.split(",") if h.strip()]
            allowed = ", ".join(n for n in names if n.replace("-", "").isalnum()) or (
                _ALLOW_HEADERS
            )
            headers += cors.headers
            headers += [
                ("Access-Control-Allow-Methods", "POST, OPTIONS"),
                ("Access-Control-Allow-Headers", allowed),
                ("Access-Control-Max-Age", "600"),
            ]
        return web.Response(status=204, headers=headers)

    # -------------------------------------------------------------------------- RPCs

    async def _rpc(self, request: web.BaseRequest) -> web.StreamResponse:
        self.stats.calls += 1
        cors = self._cors(request)
        if cors is False:
            origin = request.headers.get("Origin", "")
            denied = errors.PermissionDenied(
                "PERMISSION_MISSING",
                f"origin {origin!r} is not allowed (CLASSMESH_GATEWAY_CORS_ORIGINS)",
                metadata={"origin": origin[:200]},
            )
            return self._reject(403, denied, None, None)
        assert cors is None or isinstance(cors, _Cors)
        headers = request.headers
        wire = content_format(headers.get("Content-Type", ""))
        if wire is None:
            return self._reject(
                415,
                errors.InvalidArgument(
                    [
                        (
                            "content-type",
                            "use application/grpc-web(+proto) or application/grpc-web-text"
                            "(+proto); JSON is not supported",
                        )
                    ]
                ),
                None,
                cors,
            )
        method = self._methods.get(request.path)
        if method is None:
            return self._reject(
                200,
                errors.Unimplemented(
                    message=f"unknown method {request.path[:200]!r}",
                    metadata={"method": request.path[:200]},
                ),
                wire,
                cors,
            )
        route = method.route
        if route.kind is CallKind.UNSUPPORTED:
            return self._reject(
                200,
                errors.Unimplemented(message=route.hint, metadata={"method": route.path}),
                wire,
                cors,
            )
        limit = self.settings.max_request_bytes
        if wire.text:
            limit = (limit + 2) // 3 * 4 + 64
        try:
            body = await self._read_body(request, limit)
            message = decode_request_body(body, wire)
            raw_timeout = headers.get("grpc-timeout")
            timeout = parse_grpc_timeout(raw_timeout) if raw_timeout else None
            metadata = metadata_from_headers(headers.items())
        except _TooLarge:
            err = errors.ClassMeshError(
                "RESOURCE_EXHAUSTED",
                f"request larger than {self.settings.max_request_bytes} bytes",
                metadata={"limitBytes": str(self.settings.max_request_bytes)},
                code=grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            resp = self._reject(413, err, wire, cors)
            resp.force_close()
            return resp
        except FrameError as exc:
            return self._reject(
                400, errors.InvalidArgument([(exc.field, exc.description)]), wire, cors
            )
        if method.unary is not None:
            return await self._unary(method.unary, message, timeout, metadata, wire, cors)
        assert method.stream is not None
        return await self._stream(request, method.stream, message, timeout, metadata, wire, cors)

    @staticmethod
    async def _read_body(request: web.BaseRequest, limit: int) -> bytes:
        length = request.content_length
        content = request.content
        if length is not None:
            if length > limit:
                raise _TooLarge
            if length == 0:
                return b""
            try:
                return await content.readexactly(length)
            except asyncio.IncompleteReadError as exc:
                raise FrameError("body", "request body ended early") from exc
        data = bytearray()
        while chunk := await content.readany():
            data += chunk
            if len(data) > limit:
                raise _TooLarge
        return bytes(data)

    async def _unary(
        self,
        multicallable: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
        message: bytes,
        timeout: float | None,
        metadata: tuple[tuple[str, str | bytes], ...],
        wire: WireFormat,
        cors: _Cors | None,
    ) -> web.Response:
        call = multicallable(message, timeout=timeout, metadata=metadata)
        try:
            reply: bytes = await call
        except grpc.aio.AioRpcError as exc:
            return self._trailers_only(exc, wire, cors)
        initial = await call.initial_metadata()
        trailing = await call.trailing_metadata()
        body = data_frame(reply) + trailer_frame(trailer_block(0, "", trailing))
        if wire.text:
            body = base64.b64encode(body)
        headers = [("Content-Type", wire.response_content_type), *response_headers(initial)]
        if cors is not None:
            headers += self._cors_response(cors, initial)
        return web.Response(body=body, headers=headers)

    async def _stream(
        self,
        request: web.BaseRequest,
        multicallable: grpc.aio.UnaryStreamMultiCallable[bytes, bytes],
        message: bytes,
        timeout: float | None,
        metadata: tuple[tuple[str, str | bytes], ...],
        wire: WireFormat,
        cors: _Cors | None,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        call = multicallable(message, timeout=timeout, metadata=metadata)
        state = _Stream(task=task, last_message=loop.time())
        self._streams.add(state)
        self.stats.streams_open += 1
        resp: web.StreamResponse | None = None
        encode: Callable[[bytes], bytes] = base64.b64encode if wire.text else _identity
        try:
            try:
                msg = await call.read()
                state.last_message = loop.time()
                initial = await call.initial_metadata()
            except grpc.aio.AioRpcError as exc:
                return self._trailers_only(exc, wire, cors)
            headers = [("Content-Type", wire.response_content_type), *response_headers(initial)]
            if cors is not None:
                headers += self._cors_response(cors, initial)
            resp = web.StreamResponse(headers=headers)
            await resp.prepare(request)
            transport = request.transport
            if transport is not None:
                transport.set_write_buffer_limits(high=self.settings.stream_buffer_bytes)
            while msg is not grpc.aio.EOF:
                assert isinstance(msg, bytes)
                state.writing_since = loop.time()
                await resp.write(encode(data_frame(msg)))
                state.writing_since = 0.0
                msg = await call.read()
                state.last_message = loop.time()
            trailing = await call.trailing_metadata()
            await resp.write(encode(trailer_frame(trailer_block(0, "", trailing))))
            await resp.write_eof()
            return resp
        except grpc.aio.AioRpcError as exc:
            assert resp is not None
            await self._end_stream(resp, request, encode, _status_of(exc), _metadata_of(exc))
            return resp
        except asyncio.CancelledError:
            call.cancel()
            if not state.cut:
                raise  # the client went away (or the handler is being torn down)
            task.uncancel()
            err = self._cut_error(state.cut)
            if resp is None:
                return self._reject(200, err, wire, cors)
            await self._end_stream(resp, request, encode, _error_status(err), ())
            return resp
        except ConnectionError:
            call.cancel()  # client gone mid-write; nothing left to tell it
            return resp or web.Response(status=499)
        finally:
            self._streams.discard(state)
            self.stats.streams_open -= 1
            if not call.done():
                call.cancel()

    def _cut_error(self, why: str) -> errors.ClassMeshError:
        s = self.settings
        if why == "slow":
            self.stats.slow_cut += 1
            return errors.ResourceExhausted(
                "SLOW_CONSUMER",
                0.0,
                f"the client did not read the stream for {s.slow_client_seconds:g} s; "
                "resume with after_seq",
            )
        if why == "idle":
            self.stats.idle_closed += 1
            return errors.Unavailable(
                "UNAVAILABLE",
                0.0,
                f"no message for {s.stream_idle_seconds:g} s; resume with after_seq",
            )
        return errors.Unavailable("SHUTTING_DOWN", 1.0, "the gateway is shutting down")

    async def _end_stream(
        self,
        resp: web.StreamResponse,
        request: web.BaseRequest,
        encode: Callable[[bytes], bytes],
        status: _Status,
        trailing: Sequence[tuple[str, str | bytes]],
    ) -> None:
        """Write the trailer frame of a failed stream; a client that will not take it within
        a second loses the connection (what was written is flushed if it ever reads)."""
        code, message, details = status
        md = [m for m in trailing if m[0] != _DETAILS_KEY]
        md.append((_DETAILS_KEY, details))
        block = trailer_block(code, message, md)
        try:
            async with asyncio.timeout(1.0):
                await resp.write(encode(trailer_frame(block)))
                await resp.write_eof()
        except (TimeoutError, ConnectionError):
            if request.transport is not None:
                request.transport.close()

    # ------------------------------------------------------------------ responses

    def _cors_response(
        self, cors: _Cors, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> list[tuple[str, str]]:
        expose = _EXPOSE
        if metadata:
            expose += "".join(", " + k for k, _ in metadata)
        return [*cors.headers, ("Access-Control-Expose-Headers", expose)]

    def _trailers_only(
        self, exc: grpc.aio.AioRpcError, wire: WireFormat, cors: _Cors | None
    ) -> web.Response:
        status = _status_of(exc)
        md = [*(exc.initial_metadata() or ()), *_metadata_of(exc)]
        return self._status_response(200, status, md, wire, cors)

    def _reject(
        self,
        http_status: int,
        err: errors.ClassMeshError,
        wire: WireFormat | None,
        cors: _Cors | None,
    ) -> web.Response:
        self.stats.rejected += 1
        log.debug(
            "grpc-web request rejected",
            extra={"http_status": http_status, "reason": err.reason, "detail": err.message},
        )
        return self._status_response(http_status, _error_status(err), (), wire, cors)

    def _status_response(
        self,
        http_status: int,
        status: _Status,
        metadata: Sequence[tuple[str, str | bytes]],
        wire: WireFormat | None,
        cors: _Cors | None,
    ) -> web.Response:
        code, message, details = status
        ctype = wire.response_content_type if wire else "application/grpc-web+proto"
        headers = [("Content-Type", ctype), ("grpc-status", str(code))]
        if message:
            headers.append(("grpc-message", encode_grpc_message(message)))
        md = [m for m in metadata if m[0] != _DETAILS_KEY]
        md.append((_DETAILS_KEY, details))
        headers += response_headers(md)
        if cors is not None:
            headers += self._cors_response(cors, md)
        return web.Response(status=http_status, headers=headers)

    # ----------------------------------------------------------------------- files

    def _file(self, request: web.BaseRequest) -> web.StreamResponse:
        root = self._static
        path = request.path
        if path == "/":
            path = "/index.html"
        parts = path[1:].split("/")
        if root is None or any(
            not p or p.startswith(".") or "\\" in p or "\x00" in p for p in parts
        ):
            return web.Response(status=404, text="not found\n")
        file = root.joinpath(*parts)
        try:
            resolved = file.resolve(strict=True)
        except (OSError, RuntimeError):
            return web.Response(status=404, text="not found\n")
        if not resolved.is_relative_to(root) or not resolved.is_file():
            return web.Response(status=404, text="not found\n")
        ctype = _STATIC_TYPES.get(resolved.suffix.lower())
        if ctype is None:
            ctype = mimetypes.guess_type(resolved.name)[0] or "application/octet-stream"
        return web.FileResponse(
            resolved,
            headers={
                "Content-Type": ctype,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )


def _identity(data: bytes) -> bytes:
    return data


def _metadata_of(exc: grpc.aio.AioRpcError) -> tuple[tuple[str, str | bytes], ...]:
    return tuple(exc.trailing_metadata() or ())


def _status_of(exc: grpc.aio.AioRpcError) -> _Status:
    """The upstream status, its details byte-exact; a status the gRPC library made up itself
    (deadline, connection failure) gets an ErrorInfo so every error carries one."""
    code = exc.code()
    message = exc.details() or ""
    for key, value in exc.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            return code.value[0], message, value
    reason = _LOCAL_REASONS.get(code, "INTERNAL")
    err = errors.ClassMeshError(reason, message or code.name.lower(), code=code)
    return code.value[0], message, errors.to_rpc_status(err).SerializeToString()


def _error_status(err: errors.ClassMeshError) -> _Status:
    status = errors.to_rpc_status(err)
    return status.code, status.message, status.SerializeToString()
