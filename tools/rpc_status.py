"""Print the README's RPC status table from the generated descriptors and the servicers.

An RPC counts as implemented when its service's servicer class (returned by
`classmesh.<service>.servicer.create_servicer`) defines the method itself; otherwise the
generated base answers UNIMPLEMENTED. `tests/unit/test_readme_status.py` fails when the
README's table differs from this output; `python tools/rpc_status.py --write` updates it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN = "<!-- rpc-status:begin -->"
END = "<!-- rpc-status:end -->"


def _servicer_class(short: str) -> type | None:
    try:
        mod = importlib.import_module(f"classmesh.{short}.servicer")
    except ModuleNotFoundError as exc:
        if exc.name == f"classmesh.{short}.servicer":
            return None
        raise
    cls = getattr(mod, "SERVICER_CLASS", None)
    return cls if isinstance(cls, type) else None


def table() -> str:
    from classmesh.core.server import SERVICES

    rows = ["| service | RPC | kind | status |", "|---|---|---|---|"]
    for short, full in SERVICES.items():
        gen = importlib.import_module(f"classmesh.{short}.v1.{short}_service_pb2")
        svc = gen.DESCRIPTOR.services_by_name[full.rsplit(".", 1)[1]]
        impl = _servicer_class(short)
        for m in svc.methods:
            kind = {
                (False, False): "unary",
                (False, True): "server stream",
                (True, False): "client stream",
                (True, True): "bidi stream",
            }[(m.client_streaming, m.server_streaming)]
            works = impl is not None and m.name in impl.__dict__
            status = "works" if works else "UNIMPLEMENTED (not built yet)"
            rows.append(f"| {svc.name} | `{m.name}` | {kind} | {status} |")
    return "\n".join(rows)


def readme_table() -> str:
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip()


def main() -> int:
    generated = table()
    if "--write" in sys.argv:
        text = README.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        README.write_text(text[:start] + "\n" + generated + "\n" + text[end:])
    else:
        print(generated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
