"""What the Janus back-end reads from a publisher's SDP offer: its media sections.

Janus names a publisher's streams by their `mid`; ClassMesh names producers by the client's
track id (`client_track_id`, the msid's track part). `media_sections()` gives both per m-line,
with the simulcast rids, so producers can be bound to Janus streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MediaSection", "media_sections"]


@dataclass(frozen=True, slots=True)
class MediaSection:
    index: int
    kind: str
    mid: str
    #: Track id of `a=msid:<stream> <track>` ("" when absent).
    track_id: str
    #: Direction attribute (sendrecv, sendonly, recvonly, inactive).
    direction: str
    #: `a=rid:<id> send` ids, in SDP order (simulcast encodings).
    rids: tuple[str, ...]
    port: int


@dataclass(slots=True)
class _Open:
    kind: str
    port: int
    mid: str = ""
    track_id: str = ""
    direction: str = "sendrecv"
    rids: list[str] = field(default_factory=list)


def media_sections(sdp: str) -> list[MediaSection]:
    out: list[MediaSection] = []
    current: _Open | None = None

    def close(section: _Open | None) -> None:
        if section is not None:
            out.append(
                MediaSection(
                    index=len(out),
                    kind=section.kind,
                    mid=section.mid,
                    track_id=section.track_id,
                    direction=section.direction,
                    rids=tuple(section.rids),
                    port=section.port,
                )
            )

    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            close(current)
            parts = line[2:].split()
            port = parts[1] if len(parts) > 1 and parts[1].isdigit() else "0"
            current = _Open(kind=parts[0] if parts else "", port=int(port))
        elif current is None:
            continue
        elif line.startswith("a=mid:"):
            current.mid = line[6:].strip()
        elif line.startswith("a=msid:"):
            words = line[7:].split()
            if len(words) > 1:
                current.track_id = words[1]
        elif line.startswith("a=rid:"):
            words = line[6:].split()
            if len(words) > 1 and words[1] == "send":
                current.rids.append(words[0])
        elif line[:2] == "a=" and line[2:] in ("sendrecv", "sendonly", "recvonly", "inactive"):
            current.direction = line[2:]
    close(current)
    return out
