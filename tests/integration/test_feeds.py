"""`event_feed` behind a real gRPC server stream: typed events, replay then live, errors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from classmesh.core.config import Config
from classmesh.core.feeds import event_feed
from classmesh.core.interceptors import ErrorInterceptor
from classmesh.core.runtime import Runtime, open_runtime
from classmesh.events.v1 import events_pb2
from tests.support.db import commit_event, make_session

METHOD = "/classmesh.test.v1.FeedService/Watch"


@pytest.fixture
async def runtime(database_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[Runtime]:
    cfg = Config(database_url=database_url, redis_url=redis_url, redis_prefix=redis_prefix)
    rt = await open_runtime(cfg, database_url=database_url, redis_url=redis_url)
    yield rt
    await rt.close()


@pytest.fixture
async def feed_target(runtime: Runtime) -> AsyncIterator[tuple[str, str]]:
    """A server whose one stream RPC takes 'tenant/session/after_seq' and runs event_feed."""

    async def watch(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:  # type: ignore[type-arg]
        tenant_id, session_id, after = request.decode().split("/")
        async for event in event_feed(
            runtime, tenant_id=tenant_id, session_id=session_id, after_seq=int(after)
        ):
            yield event.SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        "classmesh.test.v1.FeedService",
        {"Watch": grpc.unary_stream_rpc_method_handler(watch)},
    )
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", METHOD
    await server.stop(0)


def _open(target: str, request: str) -> tuple[grpc.aio.Channel, grpc.aio.UnaryStreamCall]:  # type: ignore[type-arg]
    channel = grpc.aio.insecure_channel(target)
    call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)(
        request.encode(), timeout=20
    )
    return channel, call


async def _chat(pool: asyncpg.Pool, runtime: Runtime, tenant: str, session: str, mid: str) -> int:
    record = await commit_event(
        pool, tenant, session, "chat_message_posted", {"message": {"id": mid}}
    )
    await runtime.bus.publish(record)
    return record.seq


async def test_replay_then_live_typed(
    pool: asyncpg.Pool, runtime: Runtime, feed_target: tuple[str, str]
) -> None:
    tenant, session = await make_session(pool)
    for i in range(3):
        await _chat(pool, runtime, tenant, session, f"m{i}")
    channel, call = _open(feed_target[0], f"{tenant}/{session}/1")
    try:
        got: list[events_pb2.Event] = []
        async for raw in call:
            got.append(events_pb2.Event.FromString(raw))
            if len(got) == 2:
                await _chat(pool, runtime, tenant, session, "live")
            if len(got) == 3:
                break
        assert [e.seq for e in got] == [2, 3, 4]
        assert [e.chat_message_posted.message.id for e in got] == ["m1", "m2", "live"]
        assert all(e.WhichOneof("payload") == "chat_message_posted" for e in got)
        assert all(e.session_id == session for e in got)
    finally:
        call.cancel()
        await channel.close()


@pytest.mark.parametrize(
    ("request_fmt", "code"),
    [
        ("{tenant}/not-a-uuid/0", grpc.StatusCode.INVALID_ARGUMENT),
        ("{tenant}/{session}/-1", grpc.StatusCode.INVALID_ARGUMENT),
        ("{tenant}/{session}/99", grpc.StatusCode.INVALID_ARGUMENT),
        ("{tenant}/{other}/0", grpc.StatusCode.NOT_FOUND),
        ("{other}/{session}/0", grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_bad_cursor_or_session_is_rejected(
    pool: asyncpg.Pool, feed_target: tuple[str, str], request_fmt: str, code: grpc.StatusCode
) -> None:
    tenant, session = await make_session(pool)
    request = request_fmt.format(tenant=tenant, session=session, other=uuid.uuid4())
    channel, call = _open(feed_target[0], request)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async with asyncio.timeout(10):
                async for _ in call:
                    pass
        assert info.value.code() == code
    finally:
        await channel.close()
