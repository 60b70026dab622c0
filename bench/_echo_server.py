"""The raw limit for unary RPCs: a bare grpc.aio server that echoes raw bytes.

One generic handler, no interceptors, no (de)serialisation. Prints `grpc: host:port` and
`ready: echo`, then serves until SIGTERM/SIGINT. Run by bench_unary.py in a subprocess.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import grpc


async def _echo(request: bytes, context: Any) -> bytes:
    return request


class _Echo(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self._handler = grpc.unary_unary_rpc_method_handler(_echo)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._handler


async def main() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_Echo(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"grpc: 127.0.0.1:{port}", flush=True)
    print("ready: echo", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
