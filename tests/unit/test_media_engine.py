"""The aiortc internals the passthrough relies on (fails loudly if aiortc changes), and the
forwarding rules: av.Packet out, no decoder, keyframe gating, bounded queues."""

from __future__ import annotations

import asyncio

import av
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtcrtpreceiver import RTCRtpReceiver

from classmesh.media.engine import hooks
from classmesh.media.engine.router import AiortcRouter, Producer, is_vp8_keyframe


def test_pinned_aiortc_internals_present() -> None:
    hooks.check_internals()


class _Packet:
    ssrc = 1234


def test_tap_hands_frames_on_and_never_decodes() -> None:
    receiver = RTCRtpReceiver.__new__(RTCRtpReceiver)
    inner = JitterBuffer(capacity=16)
    receiver._RTCRtpReceiver__jitter_buffer = inner
    got: list[tuple[bytes, int, int]] = []
    hooks.tap_receiver(receiver, lambda d, t, s: got.append((d, t, s)))
    tap = receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]

    class Inner:
        def add(self, packet: object) -> tuple[bool, object]:
            from aiortc.jitterbuffer import JitterFrame

            return False, JitterFrame(b"\x00abc", 9000)

    tap.inner = Inner()
    assert tap.add(_Packet()) == (False, None)
    assert got == [(b"\x00abc", 9000, 1234)]
    queue = receiver._RTCRtpReceiver__decoder_queue  # type: ignore[attr-defined]
    queue.put(("codec", object()))
    assert hooks.decoder_frames(receiver) == 1  # counted, never queued for decoding
    assert queue.qsize() == 0


async def test_forwarding_hands_av_packets_and_gates_on_keyframes() -> None:
    router = AiortcRouter(queue_size=4)
    producer = Producer("p", "video", "peer", "c", "video/VP8")
    router.add_producer(producer)
    consumer = router.consume("p", "v")
    producer.on_frame(b"\x01delta", 100, 1)  # delta frame: dropped until a keyframe
    assert consumer.track.queue.empty() and consumer.dropped_packets == 1
    producer.on_frame(b"\x00key", 200, 1)
    packet = await asyncio.wait_for(consumer.track.recv(), 1)
    assert isinstance(packet, av.Packet) and bytes(packet) == b"\x00key" and packet.pts == 200
    for i in range(10):  # overflow: empties the queue and waits for the next keyframe
        producer.on_frame(b"\x01d", 300 + i, 1)
    assert consumer.waiting_keyframe and consumer.track.queue.qsize() <= 4
    producer.set_moderator_muted(True)
    producer.on_frame(b"\x00key", 400, 1)
    assert consumer.track.queue.qsize() <= 4 and consumer.waiting_keyframe
    assert is_vp8_keyframe(b"\x00") and not is_vp8_keyframe(b"\x01")
    await router.close()


def test_h264_keyframes_found_by_nal_type_as_the_encoder_marks_them() -> None:
    """libx264 output (Annex-B, what aiortc's depayloader rebuilds): IDR/SPS access units are
    keyframes, every other one is not."""
    import fractions

    from classmesh.media.engine.router import is_h264_keyframe, is_keyframe

    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = 320, 180, "yuv420p"
    codec.time_base = fractions.Fraction(1, 30)
    codec.gop_size = 10
    codec.options = {"tune": "zerolatency"}
    seen = {True: 0, False: 0}
    for i in range(40):
        frame = av.VideoFrame(width=320, height=180, format="yuv420p")
        frame.planes[0].update(bytes([(i * 9) % 250]) * (frame.planes[0].line_size * 180))
        frame.pts = i
        for packet in codec.encode(frame):
            data = bytes(packet)
            assert is_h264_keyframe(data) == packet.is_keyframe, i
            assert is_keyframe("video/H264", data) == packet.is_keyframe
            seen[packet.is_keyframe] += 1
    assert seen[True] >= 3 and seen[False] >= 30
    assert not is_h264_keyframe(b"") and not is_h264_keyframe(b"\x00\x00\x01")
