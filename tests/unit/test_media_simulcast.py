"""aiortc 1.16 cannot receive simulcast (README "Media", simulcast): what happens when a
simulcast offer reaches an aiortc peer connection like the media worker's publisher one.

Fails when a future aiortc negotiates simulcast, so the aiortc back-end can be revisited
(SetPreferredLayers answers FAILED_PRECONDITION LAYERS_NOT_SUPPORTED until then)."""

from __future__ import annotations

from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.rtcdtlstransport import RtpRouter
from aiortc.rtp import RtpPacket

RID_EXT = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
REPAIRED_EXT = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"


async def _offer() -> str:
    client = RTCPeerConnection()
    client.addTransceiver(VideoStreamTrack(), direction="sendonly")
    await client.setLocalDescription(await client.createOffer())
    sdp = client.localDescription.sdp
    await client.close()
    return str(sdp)


def _video_section(sdp: str) -> str:
    return sdp[sdp.index("m=video") :]


def _with_rid_simulcast(sdp: str) -> str:
    """What a browser offers for three rid encodings on one m-line (RFC 8853)."""
    extra = "\r\n".join(
        [
            f"a=extmap:10 {RID_EXT}",
            f"a=extmap:11 {REPAIRED_EXT}",
            "a=rid:q send",
            "a=rid:h send",
            "a=rid:f send",
            "a=simulcast:send q;h;f",
        ]
    )
    head, video = sdp.split("m=video", 1)
    return head + "m=video" + video.rstrip("\r\n") + "\r\n" + extra + "\r\n"


def _with_ssrc_simulcast(sdp: str, ssrcs: list[int]) -> str:
    """The older SSRC-group signalling of three encodings (a=ssrc-group:SIM)."""
    lines = [f"a=ssrc-group:SIM {' '.join(map(str, ssrcs))}"]
    lines += [f"a=ssrc:{s} cname:simulcast" for s in ssrcs]
    kept = [
        line
        for line in sdp.rstrip("\r\n").split("\r\n")
        if not line.startswith(("a=ssrc:", "a=ssrc-group:"))
    ]
    return "\r\n".join(kept + lines) + "\r\n"


async def test_rid_simulcast_offer_is_answered_without_simulcast() -> None:
    offer = _with_rid_simulcast(await _offer())
    assert "a=simulcast:send q;h;f" in offer
    server = RTCPeerConnection()
    try:
        await server.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await server.setLocalDescription(await server.createAnswer())
        answer = _video_section(server.localDescription.sdp)
    finally:
        await server.close()
    # No a=simulcast, no a=rid, no rid header extension in the answer: per RFC 8853 /
    # JSEP the browser then sends one encoding only. The negotiation does not fail.
    assert "a=simulcast" not in answer and "a=rid" not in answer
    assert RID_EXT not in answer and REPAIRED_EXT not in answer
    assert "a=recvonly" in answer


async def test_ssrc_simulcast_registers_one_ssrc_and_folds_the_others_into_it() -> None:
    ssrcs = [1111, 2222, 3333]
    offer = _with_ssrc_simulcast(await _offer(), ssrcs)
    server = RTCPeerConnection()
    try:
        await server.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        (transceiver,) = server.getTransceivers()
        params = server._RTCPeerConnection__remoteRtp(transceiver)  # type: ignore[attr-defined]
        # Receive parameters carry the first SSRC only (rtcpeerconnection.py 1253-1271).
        assert {e.ssrc for e in params.encodings} == {ssrcs[0]}
        payload_type = params.codecs[0].payloadType
    finally:
        await server.close()
    # The transport's RTP router then learns every unknown SSRC with that payload type into
    # the same receiver (rtcdtlstransport.py route_rtp): three layers, one jitter buffer.
    router = RtpRouter()
    receiver = object()
    router.register_receiver(receiver, ssrcs=[ssrcs[0]], payload_types=[payload_type], mid="0")  # type: ignore[arg-type]
    for ssrc in ssrcs:
        packet = RtpPacket(payload_type=payload_type, ssrc=ssrc)
        assert router.route_rtp(packet) is receiver
    assert set(router.ssrc_table) == set(ssrcs)
