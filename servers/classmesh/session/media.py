"""SessionService's calls to MediaService, through its generated stub on the peer channel.

Services reach each other only through their gRPC APIs (ARCHITECTURE "The mesh"), with the
caller's own `authorization` so MediaService applies the same grants.

* `create_router` (StartSession, before the state change commits): UNIMPLEMENTED (no media
  service deployed yet) is tolerated and logged -> no router id; UNAVAILABLE or a timeout ->
  `Unavailable(MEDIA_UNAVAILABLE, retry 30 s)`, so StartSession fails and changes nothing;
  any other failure maps through `errors.from_rpc_error`.
* `close_router` / `disconnect_participant` (after End / Remove committed): best effort,
  in the background; failures are logged, never returned.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from typing import Any, Protocol, cast

import grpc

from classmesh.core.errors import Unavailable, from_rpc_error
from classmesh.core.runtime import Runtime
from classmesh.media.v1 import media_service_pb2, media_service_pb2_grpc

__all__ = ["MEDIA_RETRY_AFTER", "MediaClient", "RouterProvisioner"]

log = logging.getLogger("classmesh.session.media")

#: RetryInfo of MEDIA_UNAVAILABLE (seed 000: "circuit breaker active, retry after 30s").
MEDIA_RETRY_AFTER = 30.0
_NAMESPACE = uuid.UUID("8d3c1f2e-5b8a-4c61-9a57-2c8f1d0e6b41")
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def derived_request_id(request_id: str, purpose: str) -> str:
    """A request_id for a downstream call, stable across retries of the upstream request.

    Never the caller's own: MediaService would find the upstream key (claimed, uncommitted)
    in the same idempotency table and wait on it.
    """
    base = request_id or str(uuid.uuid4())
    return str(uuid.uuid5(_NAMESPACE, f"{purpose}:{base}"))


class RouterProvisioner(Protocol):
    """What SessionService needs of MediaService (a test can pass its own)."""

    async def create_router(
        self, *, session_id: str, request_id: str, authorization: str | None
    ) -> str: ...

    def close_router(self, *, router_id: str, authorization: str | None) -> None: ...

    def disconnect_participant(
        self, *, session_id: str, user_id: str, reason: str, authorization: str | None
    ) -> None: ...


class MediaClient:
    """MediaService over `runtime.peer_channel()`."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._background: set[asyncio.Task[Any]] = set()

    def _stub(self) -> media_service_pb2_grpc.MediaServiceStub:
        return media_service_pb2_grpc.MediaServiceStub(self._runtime.peer_channel())

    @staticmethod
    def _metadata(authorization: str | None) -> tuple[tuple[str, str | bytes], ...]:
        return (("authorization", authorization),) if authorization else ()

    async def create_router(
        self, *, session_id: str, request_id: str, authorization: str | None
    ) -> str:
        request = media_service_pb2.CreateRouterRequest(
            request_id=derived_request_id(request_id, "session-start-router"),
            session_id=session_id,
        )
        try:
            response = await cast(
                Awaitable[media_service_pb2.CreateRouterResponse],
                self._stub().CreateRouter(
                    request,
                    metadata=self._metadata(authorization),
                    timeout=self._runtime.config.media_call_timeout_seconds,
                ),
            )
        except grpc.aio.AioRpcError as err:
            if err.code() is grpc.StatusCode.UNIMPLEMENTED:
                log.info(
                    "MediaService.CreateRouter is not implemented; session starts without router",
                    extra={"session_id": session_id},
                )
                return ""
            if err.code() in _UNREACHABLE:
                log.warning(
                    "MediaService unavailable on start",
                    extra={"session_id": session_id, "detail": err.details()},
                )
                raise Unavailable(
                    "MEDIA_UNAVAILABLE",
                    MEDIA_RETRY_AFTER,
                    "the media server is unavailable; retry in 30 s",
                ) from None
            raise from_rpc_error(err) from None
        router_id: str = response.router.id
        return router_id

    def close_router(self, *, router_id: str, authorization: str | None) -> None:
        if not router_id:
            return
        request = media_service_pb2.CloseRouterRequest(
            request_id=derived_request_id(router_id, "session-end-router"), router_id=router_id
        )
        self._spawn(
            self._stub().CloseRouter(request, metadata=self._metadata(authorization), timeout=5),
            "CloseRouter",
        )

    def disconnect_participant(
        self, *, session_id: str, user_id: str, reason: str, authorization: str | None
    ) -> None:
        request = media_service_pb2.DisconnectParticipantRequest(
            request_id=str(uuid.uuid4()),
            session_id=session_id,
            user_id=user_id,
            reason=reason[:200],
        )
        self._spawn(
            self._stub().DisconnectParticipant(
                request, metadata=self._metadata(authorization), timeout=5
            ),
            "DisconnectParticipant",
        )

    def _spawn(self, call: Any, name: str) -> None:
        async def run() -> None:
            try:
                await call
            except grpc.aio.AioRpcError as err:
                if err.code() is not grpc.StatusCode.UNIMPLEMENTED:
                    log.warning(
                        "best-effort MediaService call failed",
                        extra={"call": name, "code": err.code().name, "detail": err.details()},
                    )
            except Exception:  # background work must never crash the loop quietly
                log.exception("best-effort MediaService call failed", extra={"call": name})

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
