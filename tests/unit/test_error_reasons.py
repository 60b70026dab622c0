"""Every ErrorInfo reason the server can send is declared in `classmesh.common.v1.ErrorReason`,
so clients can switch on the generated enum instead of guessing strings."""

from __future__ import annotations

import re
from pathlib import Path

from classmesh.common.v1 import common_pb2
from classmesh.core import errors

SERVER = Path(__file__).resolve().parents[2] / "servers" / "classmesh"
DECLARED = {n.removeprefix("ERROR_REASON_") for n in common_pb2.ErrorReason.keys()} - {
    "UNSPECIFIED"
}
_RAISE = re.compile(
    r"\b(?:Unauthenticated|FailedPrecondition|AlreadyExists|Aborted|ResourceExhausted|"
    r"Unavailable|PermissionDenied|ClassMeshError)\(\s*(?:reason=)?\"([A-Z][A-Z0-9_]*)\"",
    re.S,
)


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def test_default_reasons_are_declared() -> None:
    defaults = {
        c.default_reason for c in _subclasses(errors.ClassMeshError) if "default_reason" in vars(c)
    }
    assert defaults, "error classes must declare default reasons"
    assert defaults <= DECLARED, sorted(defaults - DECLARED)


def test_reasons_raised_in_server_code_are_declared() -> None:
    used: dict[str, str] = {}
    for path in SERVER.rglob("*.py"):
        for match in _RAISE.finditer(path.read_text()):
            used.setdefault(match.group(1), str(path.relative_to(SERVER)))
    assert "TOKEN_EXPIRED" in used, "the scan must find the auth reasons"
    missing = {r: where for r, where in used.items() if r not in DECLARED}
    assert not missing, missing
