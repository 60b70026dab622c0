"""gRPC edge of MediaService: signaling streams and router management.

Signal (bidi) runs every client signal through the same `MediaService.handle` as SendSignal
and streams the caller's signal buffer like ReceiveSignals (replies included, in seq order).
A failing signal answers with an `error` signal and the stream goes on; the stream itself
ends with an error only when the caller may no longer signal (removed, session ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from classmesh.core.auth import Principal, current_principal
from classmesh.core.errors import InvalidArgument, Validator
from classmesh.core.runtime import Runtime
from classmesh.media.engine import hooks
from classmesh.media.service import TURN_TTL_MAX, TURN_TTL_MIN, MediaService, Peer
from classmesh.media.v1 import media_pb2, media_service_pb2, media_service_pb2_grpc

__all__ = ["MediaServicer", "SERVICER_CLASS", "create_servicer"]

R = media_service_pb2
_Ctx = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger("classmesh.media")


def _principal(context: _Ctx) -> Principal:
    return current_principal()


def _room(v: Validator, field: str, value: str) -> str:
    return v.require_uuid(field, value) if value else ""


class MediaServicer(media_service_pb2_grpc.MediaServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        hooks.check_internals()  # fail at start, not at the first call, if aiortc changed
        self.runtime = runtime
        self.service = MediaService(runtime)
        self.service.start()  # media worker processes start with the service
        runtime.on_close(self.service.close_all)

    # ------------------------------------------------------------------ signaling

    async def SendSignal(self, request: R.SendSignalRequest, context: _Ctx) -> R.SendSignalResponse:
        principal = _principal(context)
        v = Validator()
        v.require_len("request_id", request.request_id, 1, 128)
        v.raise_if_any()
        _, reply = await self.service.handle(principal, request.signal)
        return R.SendSignalResponse(reply=reply)

    async def ReceiveSignals(
        self, request: R.ReceiveSignalsRequest, context: _Ctx
    ) -> AsyncIterator[R.ReceiveSignalsResponse]:
        principal = _principal(context)
        v = Validator()
        session_id = v.require_uuid("session_id", request.session_id)
        room_id = _room(v, "breakout_room_id", request.breakout_room_id)
        v.require_range("after_seq", request.after_seq, 0, 2**63 - 1)
        v.raise_if_any()
        peer = await self.service.peer(principal, session_id, room_id)
        async for signal in peer.signals(request.after_seq):
            yield R.ReceiveSignalsResponse(signal=signal)

    async def Signal(
        self, request_iterator: AsyncIterator[R.SignalRequest], context: _Ctx
    ) -> AsyncIterator[R.SignalResponse]:
        principal = _principal(context)
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        peer, _ = await self.service.handle(principal, first.signal)
        assert peer is not None
        state: dict[str, Peer] = {"peer": peer}

        async def read() -> None:
            async for message in request_iterator:
                current = state["peer"]
                if current.closed:
                    return
                new, _ = await self.service.handle(principal, message.signal, current)
                if new is not None and new is not current:
                    raise InvalidArgument(
                        [("signal.session_id", "one Signal stream serves one room")]
                    )

        reader = asyncio.get_running_loop().create_task(read())
        try:
            async for signal in peer.signals(0):
                yield R.SignalResponse(signal=signal)
                if reader.done() and reader.exception() is not None:
                    raise reader.exception()  # type: ignore[misc]
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    # ------------------------------------------------------------------ routers

    async def CreateRouter(
        self, request: R.CreateRouterRequest, context: _Ctx
    ) -> R.CreateRouterResponse:
        principal = _principal(context)
        v = Validator()
        v.require_len("request_id", request.request_id, 1, 128)
        session_id = v.require_uuid("session_id", request.session_id)
        room_id = _room(v, "breakout_room_id", request.breakout_room_id)
        v.require_enum("backend", request.backend, [0, 1, 2])
        v.raise_if_any()
        entry, created = await self.service.create_router(
            principal, session_id, room_id, backend=request.backend
        )
        return R.CreateRouterResponse(router=entry.proto(), created=created)

    async def GetRouter(self, request: R.GetRouterRequest, context: _Ctx) -> R.GetRouterResponse:
        principal = _principal(context)
        v = Validator()
        if request.router_id:
            router_id = v.require_uuid("router_id", request.router_id)
            v.raise_if_any()
            return R.GetRouterResponse(router=self.service.get_router(principal, router_id).proto())
        session_id = v.require_uuid("session_id", request.session_id)
        room_id = _room(v, "breakout_room_id", request.breakout_room_id)
        v.raise_if_any()
        entry = self.service.find_router(principal, session_id, room_id)
        return R.GetRouterResponse(router=entry.proto())

    async def CloseRouter(
        self, request: R.CloseRouterRequest, context: _Ctx
    ) -> R.CloseRouterResponse:
        principal = _principal(context)
        v = Validator()
        v.require_len("request_id", request.request_id, 1, 128)
        router_id = v.require_uuid("router_id", request.router_id)
        v.raise_if_any()
        entry = self.service.get_router(principal, router_id)
        self.service.check_staff(principal)
        await self.service.close_router(entry)
        return R.CloseRouterResponse(router=entry.proto())

    async def MoveParticipant(
        self, request: R.MoveParticipantRequest, context: _Ctx
    ) -> R.MoveParticipantResponse:
        principal = _principal(context)
        v = Validator()
        v.require_len("request_id", request.request_id, 1, 128)
        session_id = v.require_uuid("session_id", request.session_id)
        v.require_len("user_id", request.user_id, 1, 128)
        room_id = _room(v, "to_breakout_room_id", request.to_breakout_room_id)
        v.raise_if_any()
        from_id, target = await self.service.move_participant(
            principal, session_id, request.user_id, room_id
        )
        return R.MoveParticipantResponse(from_router_id=from_id, to_router=target.proto())

    async def DisconnectParticipant(
        self, request: R.DisconnectParticipantRequest, context: _Ctx
    ) -> R.DisconnectParticipantResponse:
        principal = _principal(context)
        v = Validator()
        v.require_len("request_id", request.request_id, 1, 128)
        session_id = v.require_uuid("session_id", request.session_id)
        v.require_len("user_id", request.user_id, 1, 128)
        v.require_len("reason", request.reason, 0, 200)
        v.raise_if_any()
        self.service.check_token(principal, session_id)
        self.service.check_staff(principal)
        ids = await self.service.disconnect_user(
            principal.tenant_id, session_id, request.user_id, None
        )
        return R.DisconnectParticipantResponse(unpublished_track_ids=ids)

    # ------------------------------------------------------------------ read-only

    async def ListRouters(
        self, request: R.ListRoutersRequest, context: _Ctx
    ) -> R.ListRoutersResponse:
        principal = _principal(context)
        v = Validator()
        session_id = v.require_uuid("session_id", request.session_id) if request.session_id else ""
        v.require_range("page_size", request.page_size, 0, 2**31 - 1)
        v.raise_if_any()
        routers, token, total = self.service.list_routers(
            principal, session_id, request.page_size, request.page_token, request.include_closed
        )
        return R.ListRoutersResponse(routers=routers, next_page_token=token, total_size=total)

    async def ListTracks(self, request: R.ListTracksRequest, context: _Ctx) -> R.ListTracksResponse:
        principal = _principal(context)
        v = Validator()
        session_id = v.require_uuid("session_id", request.session_id)
        room_id = _room(v, "breakout_room_id", request.breakout_room_id)
        v.require_range("page_size", request.page_size, 0, 2**31 - 1)
        v.raise_if_any()
        tracks, token = self.service.list_tracks(
            principal, session_id, room_id, request.page_size, request.page_token
        )
        return R.ListTracksResponse(tracks=tracks, next_page_token=token)

    async def GetRouterCapabilities(
        self, request: R.GetRouterCapabilitiesRequest, context: _Ctx
    ) -> R.GetRouterCapabilitiesResponse:
        principal = _principal(context)
        v = Validator()
        session_id = v.require_uuid("session_id", request.session_id)
        room_id = _room(v, "breakout_room_id", request.breakout_room_id)
        v.raise_if_any()
        router_id, caps = self.service.capabilities(principal, session_id, room_id)
        return R.GetRouterCapabilitiesResponse(router_id=router_id, capabilities=caps)

    async def GetTurnCredentials(
        self, request: R.GetTurnCredentialsRequest, context: _Ctx
    ) -> R.GetTurnCredentialsResponse:
        principal = _principal(context)
        v = Validator()
        session_id = v.require_uuid("session_id", request.session_id)
        ttl: int | None = None
        if request.HasField("ttl"):
            ttl = request.ttl.seconds
            v.check(
                request.ttl.nanos == 0 and TURN_TTL_MIN <= ttl <= TURN_TTL_MAX,
                "ttl",
                f"must be whole seconds, {TURN_TTL_MIN}-{TURN_TTL_MAX}",
            )
        v.raise_if_any()
        username, credential, lifetime, expiry, urls = self.service.turn_credentials(
            principal, session_id, ttl
        )
        resp = R.GetTurnCredentialsResponse(username=username, credential=credential, urls=urls)
        resp.ttl.seconds = lifetime
        resp.expire_time.seconds = expiry
        stun = [u for u in urls if u.startswith("stun:")]
        turn = [u for u in urls if not u.startswith("stun:")]
        if stun:
            resp.ice_servers.append(media_pb2.IceServer(urls=stun))
        if turn:
            resp.ice_servers.append(
                media_pb2.IceServer(urls=turn, username=username, credential=credential)
            )
        return resp

    async def GetMediaStats(
        self, request: R.GetMediaStatsRequest, context: _Ctx
    ) -> R.GetMediaStatsResponse:
        principal = _principal(context)
        v = Validator()
        session_id = v.require_uuid("session_id", request.session_id)
        room_id = _room(v, "breakout_room_id", request.breakout_room_id)
        v.require_len("user_id", request.user_id, 0, 128)
        v.raise_if_any()
        routers, workers = await self.service.media_stats(
            principal, session_id, room_id or None, request.user_id
        )
        return R.GetMediaStatsResponse(routers=routers, workers=workers)


SERVICER_CLASS = MediaServicer


def create_servicer(runtime: Runtime) -> MediaServicer:
    return MediaServicer(runtime)
