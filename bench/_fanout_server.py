"""The raw limit for fan-out: a bare grpc.aio server that streams each sent message to every
subscriber.

Two generic methods, no interceptors, no (de)serialisation, no database, no Redis:
`/bench.Fanout/Subscribe` (server stream: raw bytes out) and `/bench.Fanout/Send` (unary:
the bytes to deliver; answered once every subscriber's queue has them). One event loop
writes all streams, as a ClassMesh instance does. Prints `grpc: host:port` and
`ready: fanout`, then serves until SIGTERM/SIGINT. Run by bench_fanout_chat.py.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc

_subscribers: set[asyncio.Queue[bytes]] = set()


async def _subscribe(request: bytes, context: Any) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    _subscribers.add(queue)
    try:
        while True:
            yield await queue.get()
    finally:
        _subscribers.discard(queue)


async def _send(request: bytes, context: Any) -> bytes:
    for queue in _subscribers:
        queue.put_nowait(request)
    return b""


class _Fanout(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self._subscribe = grpc.unary_stream_rpc_method_handler(_subscribe)
        self._send = grpc.unary_unary_rpc_method_handler(_send)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        if handler_call_details.method == "/bench.Fanout/Subscribe":
            return self._subscribe
        if handler_call_details.method == "/bench.Fanout/Send":
            return self._send
        return None


async def main() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_Fanout(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"grpc: 127.0.0.1:{port}", flush=True)
    print("ready: fanout", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
