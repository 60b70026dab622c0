"""grpc-web wire format: frames, text mode, `grpc-timeout`, headers <-> gRPC metadata.

A grpc-web body is a sequence of frames `flag(1) length(4, big endian) payload`: flag 0x00
carries one protobuf message, flag 0x80 the trailers (`name: value\\r\\n` lines, HTTP/1.1
header syntax). Text mode (`application/grpc-web-text`) base64-encodes the body; a client
may encode each frame on its own, so padding can appear in the middle of a request body.

Everything here works on bytes and never parses a message: the gateway forwards payloads
as they came.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

__all__ = [
    "FrameError",
    "WireFormat",
    "content_format",
    "data_frame",
    "decode_request_body",
    "encode_grpc_message",
    "metadata_from_headers",
    "parse_grpc_timeout",
    "response_headers",
    "trailer_block",
    "trailer_frame",
]

_HEADER = struct.Struct(">BI")
_DATA = 0x00
_COMPRESSED = 0x01
_TRAILER = 0x80


class FrameError(ValueError):
    """The request body or a request header is not valid grpc-web."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


@dataclass(frozen=True, slots=True)
class WireFormat:
    """How one request's body is encoded and what the response says it is."""

    text: bool
    response_content_type: str


_BINARY = WireFormat(False, "application/grpc-web+proto")
_TEXT = WireFormat(True, "application/grpc-web-text+proto")
_FORMATS: dict[str, WireFormat] = {
    "application/grpc-web": _BINARY,
    "application/grpc-web+proto": _BINARY,
    "application/grpc-web-text": _TEXT,
    "application/grpc-web-text+proto": _TEXT,
}


def content_format(content_type: str) -> WireFormat | None:
    """The wire format of a request Content-Type (parameters ignored); None if unsupported."""
    found = _FORMATS.get(content_type)
    if found is not None:
        return found
    base = content_type.split(";", 1)[0].strip().lower()
    return _FORMATS.get(base)


# ------------------------------------------------------------------------------ frames


def data_frame(message: bytes) -> bytes:
    return _HEADER.pack(_DATA, len(message)) + message


def trailer_frame(block: bytes) -> bytes:
    return _HEADER.pack(_TRAILER, len(block)) + block


_PADDED_SEGMENT = re.compile(rb"[^=]*=*")


def _b64decode(text: bytes) -> bytes:
    """Base64 of one or more concatenated, individually padded segments."""
    text = text.strip()
    eq = text.find(b"=")
    try:
        if eq < 0 or text.rstrip(b"=").find(b"=") < 0:
            return binascii.a2b_base64(text, strict_mode=True)
        out = bytearray()
        for match in _PADDED_SEGMENT.finditer(text):
            segment = match.group()
            if segment:
                out += binascii.a2b_base64(segment, strict_mode=True)
        return bytes(out)
    except binascii.Error as exc:
        raise FrameError("body", f"invalid base64 ({exc})") from None


def decode_request_body(body: bytes, wire: WireFormat) -> bytes:
    """The one message a unary or server-streaming request carries.

    Raises FrameError for anything but exactly one uncompressed data frame.
    """
    if wire.text:
        body = _b64decode(body)
    if len(body) < 5:
        raise FrameError("body", f"expected a 5-byte frame header, got {len(body)} bytes")
    flag, length = _HEADER.unpack_from(body)
    if flag == _COMPRESSED:
        raise FrameError("body", "compressed frames are not supported (use identity encoding)")
    if flag != _DATA:
        raise FrameError("body", f"expected a data frame, got flag 0x{flag:02x}")
    end = 5 + length
    if len(body) < end:
        raise FrameError(
            "body", f"truncated frame: header says {length} bytes, got {len(body) - 5}"
        )
    if len(body) != end:
        raise FrameError("body", "exactly one message expected (extra bytes after the frame)")
    return body[5:end]


# ---------------------------------------------------------------------------- headers

_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_grpc_timeout(value: str) -> float:
    """Seconds of a `grpc-timeout` value (1-8 digits and a unit: H M S m u n)."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not (0 < len(digits) <= 8) or not digits.isdigit():
        raise FrameError("grpc-timeout", f"invalid value {value!r} (e.g. 500m, 10S)")
    return int(digits) * unit


# Printable ASCII except '%' is sent as is; everything else percent-encoded (UTF-8), as the
# gRPC spec asks of grpc-message.
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if c != 0x25)


def encode_grpc_message(message: str) -> str:
    if message.isascii() and message.isprintable() and "%" not in message:
        return message
    return quote(message, safe=_MESSAGE_SAFE)


# Request headers never forwarded as metadata: HTTP/1.1 hop-by-hop and transport headers,
# the grpc-web protocol's own headers, and what gRPC sets itself.
_DROP_REQUEST = frozenset(
    {
        "x-grpc-web",
        "x-user-agent",
        "x-forwarded-host",
    }
)
_FORWARD_REQUEST = frozenset({"authorization", "traceparent", "tracestate", "grpc-trace-bin"})
_VALID_KEY = re.compile(r"^[0-9a-z_.\-]+$")


def metadata_from_headers(
    headers: Iterable[tuple[str, str]],
) -> tuple[tuple[str, str | bytes], ...]:
    """gRPC metadata from request headers: Authorization, trace context and `x-*` headers.

    Hop-by-hop, CORS, content and grpc-web protocol headers are dropped; `-bin` values are
    base64-decoded (grpc-web sends binary metadata base64-encoded).
    """
    out: list[tuple[str, str | bytes]] = []
    for name, value in headers:
        key = name.lower()
        if key not in _FORWARD_REQUEST and not (key.startswith("x-") and key not in _DROP_REQUEST):
            continue
        if not _VALID_KEY.match(key):
            raise FrameError(name, "not a valid gRPC metadata key")
        if key.endswith("-bin"):
            try:
                out.append((key, base64.b64decode(value + "=" * (-len(value) % 4), validate=True)))
            except binascii.Error:
                raise FrameError(name, "binary header is not valid base64") from None
            continue
        if not (value.isascii() and value.isprintable()):
            raise FrameError(name, "header value must be printable ASCII")
        out.append((key, value))
    return tuple(out)


# Response metadata that must not become HTTP headers or trailer lines of their own.
_RESERVED_RESPONSE = frozenset(
    {
        "content-type",
        "content-length",
        "transfer-encoding",
        "connection",
        "te",
        "trailer",
        "grpc-status",
        "grpc-message",
        "grpc-encoding",
        "grpc-accept-encoding",
    }
)


def _header_value(key: str, value: str | bytes) -> str:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value


def response_headers(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> list[tuple[str, str]]:
    """HTTP headers from gRPC metadata (`-bin` values base64-encoded, reserved keys left out)."""
    if not metadata:
        return []
    return [(k, _header_value(k, v)) for k, v in metadata if k not in _RESERVED_RESPONSE]


def trailer_block(
    code: int, message: str, metadata: Iterable[tuple[str, str | bytes]] | None
) -> bytes:
    """The trailer frame's payload: grpc-status, grpc-message, then trailing metadata."""
    lines = [f"grpc-status: {code}\r\n"]
    if message:
        lines.append(f"grpc-message: {encode_grpc_message(message)}\r\n")
    for key, value in response_headers(metadata):
        lines.append(f"{key}: {value}\r\n")
    return "".join(lines).encode("ascii", "replace")
