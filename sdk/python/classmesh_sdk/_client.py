"""`ClassMeshClient`: one facade over the mesh with a sub-client per service."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc

from classmesh_sdk._base import _Auth
from classmesh_sdk._generated import (
    AdminServiceClient,
    BreakoutServiceClient,
    InteractionServiceClient,
    MediaServiceClient,
    RecordingServiceClient,
    SessionServiceClient,
)

__all__ = ["ClassMeshClient"]

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


class ClassMeshClient:
    """Async client of a ClassMesh deployment.

    >>> async with ClassMeshClient("127.0.0.1:50051", token=jwt) as client:
    ...     resp = await client.sessions.get_session(session_id=sid)

    `token` is an access token (see `AccessToken`); `credentials` switches to TLS.
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        opts = [*_CHANNEL_OPTIONS, *options]
        if credentials is not None:
            self._channel = grpc.aio.secure_channel(target, credentials, options=opts)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=opts)
        self._auth = _Auth(token)
        self.sessions = SessionServiceClient(self._channel, self._auth)
        self.media = MediaServiceClient(self._channel, self._auth)
        self.breakouts = BreakoutServiceClient(self._channel, self._auth)
        self.interaction = InteractionServiceClient(self._channel, self._auth)
        self.recordings = RecordingServiceClient(self._channel, self._auth)
        self.admin = AdminServiceClient(self._channel, self._auth)

    def set_token(self, token: str | None) -> None:
        """Use another access token for the calls that follow (e.g. after refresh)."""
        self._auth.token = token

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> ClassMeshClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
