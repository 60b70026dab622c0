"""The README's RPC status table says exactly which RPCs are implemented."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _rpc_status():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("rpc_status", ROOT / "tools" / "rpc_status.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_table_matches_the_servicers() -> None:
    mod = _rpc_status()
    assert mod.readme_table() == mod.table(), "run: python tools/rpc_status.py --write"


def test_table_lists_every_rpc() -> None:
    mod = _rpc_status()
    rows = [r for r in mod.table().splitlines()[2:]]
    assert len(rows) >= 100
    assert any("`GetTenant` | unary | works" in r for r in rows)
    readme = (ROOT / "README.md").read_text()
    # The two commands open the README.
    first = [ln.split("#")[0].strip() for ln in readme.splitlines()[3:5]]
    assert first == ["make run", "make test"]
