"""The one wrapper every generated SDK method goes through: deadline, retry, errors, resume."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from classmesh_sdk._errors import ClassMeshError, from_rpc_error
from classmesh_sdk._retry import DEFAULT_TIMEOUT, NO_RETRY, SAFE_RETRY, UNSAFE_RETRY, Retry

__all__ = ["MethodInfo", "ServiceClient", "Metadata", "DEFAULT"]

Metadata = Sequence[tuple[str, str]]
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


#: Sentinel: use the per-method default (timeout or retry).
DEFAULT: Any = _Default()


@dataclass(frozen=True)
class MethodInfo:
    """What the SDK knows of one RPC (generated from the proto descriptors)."""

    path: str
    request_type: type[Message]
    response_type: type[Message]
    server_streaming: bool
    client_streaming: bool
    read_only: bool
    has_request_id: bool
    has_after_seq: bool

    @property
    def default_retry(self) -> Retry:
        if self.client_streaming or self.server_streaming and not self.has_after_seq:
            return NO_RETRY
        if self.read_only or self.has_request_id or self.has_after_seq:
            return SAFE_RETRY
        return UNSAFE_RETRY


class ServiceClient:
    """Base of the per-service clients; holds the channel and the caller's credentials."""

    def __init__(self, channel: grpc.aio.Channel, auth: _Auth) -> None:
        self._channel = channel
        self._auth = auth

    def _metadata(self, extra: Metadata | None) -> list[tuple[str, str]]:
        md = list(extra or ())
        token = self._auth.token
        if token and not any(k == "authorization" for k, _ in md):
            md.append(("authorization", f"Bearer {token}"))
        return md

    async def _unary(
        self,
        info: MethodInfo,
        request: Message,
        *,
        timeout: float | None,
        metadata: Metadata | None,
        retry: Retry | None,
    ) -> Any:
        if info.has_request_id and not request.request_id:  # type: ignore[attr-defined]
            request.request_id = str(uuid.uuid4())  # type: ignore[attr-defined]
        policy = info.default_retry if retry is DEFAULT or retry is None else retry
        budget = DEFAULT_TIMEOUT if timeout is DEFAULT or timeout is None else timeout
        deadline = time.monotonic() + budget
        call = self._channel.unary_unary(
            info.path,
            request_serializer=info.request_type.SerializeToString,
            response_deserializer=info.response_type.FromString,
        )
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            try:
                return await call(
                    request, timeout=max(remaining, 0.001), metadata=self._metadata(metadata)
                )
            except grpc.aio.AioRpcError as err:
                exc = from_rpc_error(err)
                if not _should_retry(policy, exc, attempt, deadline):
                    raise exc from None
                await asyncio.sleep(_delay(policy, exc, attempt, deadline))

    async def _server_stream(
        self,
        info: MethodInfo,
        request: Message,
        *,
        timeout: float | None,
        metadata: Metadata | None,
        retry: Retry | None,
    ) -> AsyncIterator[Any]:
        """Yield responses; a feed with `after_seq` resumes after the last seq it yielded."""
        policy = info.default_retry if retry is DEFAULT or retry is None else retry
        call = self._channel.unary_stream(
            info.path,
            request_serializer=info.request_type.SerializeToString,
            response_deserializer=info.response_type.FromString,
        )
        deadline = None if timeout is DEFAULT or timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            stream = call(request, timeout=remaining, metadata=self._metadata(metadata))
            try:
                async for response in stream:
                    attempt = 0
                    seq = _event_seq(response)
                    if info.has_after_seq and seq:
                        request.after_seq = seq  # type: ignore[attr-defined]
                    yield response
                return
            except grpc.aio.AioRpcError as err:
                exc = from_rpc_error(err)
                attempt += 1
                far = deadline if deadline is not None else float("inf")
                if not _should_retry(policy, exc, attempt, far):
                    raise exc from None
                await asyncio.sleep(_delay(policy, exc, attempt, far))
            finally:
                stream.cancel()

    def _stream_stream(
        self, info: MethodInfo, *, timeout: float | None, metadata: Metadata | None
    ) -> grpc.aio.StreamStreamCall[Any, Any]:
        """Open a bidirectional stream (internal callers); the caller drives it."""
        call = self._channel.stream_stream(
            info.path,
            request_serializer=info.request_type.SerializeToString,
            response_deserializer=info.response_type.FromString,
        )
        t = None if timeout is DEFAULT else timeout
        return call(timeout=t, metadata=self._metadata(metadata))


class _Auth:
    """Mutable holder so `ClassMeshClient.set_token` reaches every sub-client."""

    def __init__(self, token: str | None) -> None:
        self.token = token


def _event_seq(response: Message) -> int:
    event = getattr(response, "event", None)
    if event is None:
        return 0
    return int(getattr(event, "seq", 0))


def _should_retry(policy: Retry, exc: ClassMeshError, attempt: int, deadline: float) -> bool:
    if attempt >= policy.attempts or exc.code not in policy.codes:
        return False
    return time.monotonic() + _delay(policy, exc, attempt, deadline) < deadline


def _delay(policy: Retry, exc: ClassMeshError, attempt: int, deadline: float) -> float:
    if exc.retry_after is not None and exc.retry_after > 0:
        return exc.retry_after
    return policy.backoff(attempt)
