"""The aiortc 1.16 internals the encoded-frame passthrough depends on (pinned; tested).

aiortc has no public hook for encoded media on the receive side (issues 449, 627; PR 562
closed). Complete encoded frames appear where the receiver's private jitter buffer
(`RTCRtpReceiver._RTCRtpReceiver__jitter_buffer`) returns them from `add(packet)`; the
receiver would then put them on its decoder queue. `tap_receiver` swaps that buffer for a
wrapper that hands each frame to a callback and returns no frame, so nothing is ever
decoded; the decoder queue is swapped for one that counts what reaches it (must stay 0).

The send side accepts `av.Packet` from a track (only `encoder.pack()`, no encoding). A
subscriber's PLI/FIR makes the sender call `self._send_keyframe()`, which would force its
own (unused) encoder: `on_keyframe_request` shadows it per sender instance.

`check_internals()` fails loudly when any of this changes; tests/unit/test_media_hooks.py
runs it, and the media service runs it at start.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable, Sequence
from typing import Any

import aioice.ice
import aiortc
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtcrtpsender import RTCRtpSender

__all__ = [
    "AIORTC_VERSION",
    "FrameSink",
    "InternalsChanged",
    "check_internals",
    "decoder_frames",
    "on_keyframe_request",
    "pin_ice_hosts",
    "send_pli",
    "tap_receiver",
]

#: The aiortc release the hooks were written against (pyproject pins `aiortc==1.16.*`).
AIORTC_VERSION = "1.16."

_JITTER = "_RTCRtpReceiver__jitter_buffer"
_DECODER_QUEUE = "_RTCRtpReceiver__decoder_queue"

#: (frame bytes, RTP timestamp, ssrc) -> None
FrameSink = Callable[[bytes, int, int], None]


class InternalsChanged(RuntimeError):
    """aiortc no longer has the internals the passthrough relies on."""


class _CountingQueue(queue.Queue[Any]):
    """The receiver's decoder queue: anything but the stop sentinel counts as a decode."""

    def __init__(self) -> None:
        super().__init__()
        self.frames = 0

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is not None:
            self.frames += 1
            return  # never decode
        super().put(item, block, timeout)


class _Tap:
    """Stands in for the receiver's JitterBuffer: reassembles, hands frames on, returns none."""

    def __init__(self, inner: Any, sink: FrameSink) -> None:
        self.inner = inner
        self.sink = sink

    def add(self, packet: Any) -> tuple[bool, None]:
        pli_flag, frame = self.inner.add(packet)
        if frame is not None:
            self.sink(frame.data, frame.timestamp, packet.ssrc)
        return pli_flag, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def check_internals() -> None:
    """Raise `InternalsChanged` unless the pinned aiortc internals are present."""
    problems: list[str] = []
    if not aiortc.__version__.startswith(AIORTC_VERSION):
        problems.append(f"aiortc {aiortc.__version__} (hooks written for {AIORTC_VERSION}x)")
    init_code = RTCRtpReceiver.__init__.__code__
    for attr in (_JITTER, _DECODER_QUEUE):
        if attr not in init_code.co_names:
            problems.append(f"RTCRtpReceiver no longer sets {attr}")
    for cls, name in (
        (RTCRtpReceiver, "_send_rtcp_pli"),
        (RTCRtpSender, "_send_keyframe"),
        (RTCRtpSender, "_handle_rtcp_packet"),
    ):
        if not callable(getattr(cls, name, None)):
            problems.append(f"{cls.__name__}.{name} is gone")
    if "_send_keyframe" not in RTCRtpSender._handle_rtcp_packet.__code__.co_names:
        problems.append("RTCRtpSender._handle_rtcp_packet no longer calls _send_keyframe")
    if _JITTER not in RTCRtpReceiver._handle_rtp_packet.__code__.co_names:
        problems.append("RTCRtpReceiver._handle_rtp_packet no longer uses the jitter buffer")
    if not callable(getattr(aioice.ice, "get_host_addresses", None)):
        problems.append("aioice.ice.get_host_addresses is gone")
    if problems:
        raise InternalsChanged("; ".join(problems))


def tap_receiver(receiver: RTCRtpReceiver, sink: FrameSink) -> None:
    """Send the receiver's reassembled encoded frames to `sink` instead of its decoder.

    Call before the receiver starts (on the peer connection's "track" event).
    """
    inner = getattr(receiver, _JITTER, None)
    if isinstance(inner, _Tap):  # already tapped (participant moved): new sink only
        inner.sink = sink
        return
    if inner is None or not hasattr(inner, "add"):
        raise InternalsChanged("RTCRtpReceiver has no jitter buffer to tap")
    setattr(receiver, _JITTER, _Tap(inner, sink))
    setattr(receiver, _DECODER_QUEUE, _CountingQueue())


def decoder_frames(receiver: RTCRtpReceiver) -> int:
    """Frames that reached the receiver's decoder since `tap_receiver` (0 = none decoded)."""
    q = getattr(receiver, _DECODER_QUEUE, None)
    return q.frames if isinstance(q, _CountingQueue) else -1


def send_pli(receiver: RTCRtpReceiver, media_ssrc: int) -> asyncio.Task[None]:
    """Ask the publisher behind `receiver` for a keyframe (RTCP PLI for its SSRC)."""
    coro = receiver._send_rtcp_pli(media_ssrc)
    return asyncio.get_running_loop().create_task(coro)


def on_keyframe_request(sender: RTCRtpSender, callback: Callable[[], None]) -> None:
    """Call `callback` when the subscriber behind `sender` sends PLI/FIR."""
    sender._send_keyframe = callback  # type: ignore[method-assign]


def pin_ice_hosts(hosts: Sequence[str]) -> None:
    """Gather host candidates only on `hosts` in this process (aioice skips 127.0.0.1)."""
    pinned = [h for h in hosts if h]
    if not pinned:
        return

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return list(pinned)

    aioice.ice.get_host_addresses = get_host_addresses
