"""Run `classmesh up` as a real subprocess and talk to it, for end-to-end tests."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class MeshProcess:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    target: str = ""
    #: The grpc-web gateway's base URL (`gateway: http://...` line of `classmesh up`).
    gateway: str = ""
    token: str = ""
    tenant_id: str = ""
    _q: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_ready(self, timeout: float = 60.0) -> None:
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if line.startswith("grpc: "):
                self.target = line.split(" ", 1)[1]
            elif line.startswith("gateway: "):
                self.gateway = line.split(" ", 1)[1]
            elif line.startswith("token: "):
                self.token = line.split(" ", 1)[1]
            elif line.startswith("tenant: "):
                self.tenant_id = line.split(" ", 1)[1]
            elif line.startswith("ready: "):
                return
        self.kill()
        raise AssertionError(
            "classmesh up did not become ready; stdout:\n"
            + "\n".join(self.lines)
            + "\nstderr tail:\n"
            + self.stderr_tail()
        )

    def stderr_tail(self) -> str:
        path = getattr(self, "_stderr_path", None)
        if path and os.path.exists(path):
            return "\n".join(Path(path).read_text(errors="replace").splitlines()[-40:])
        return ""

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_mesh(env_overrides: dict[str, str], stderr_path: str, *args: str) -> MeshProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSMESH_")}
    # Several meshes and test pools share one PostgreSQL (max_connections 100 on our
    # machines): a test mesh keeps a small pool unless the test asks for more.
    env.update(
        {
            "CLASSMESH_LISTEN": "127.0.0.1:0",
            "CLASSMESH_GATEWAY_LISTEN": "127.0.0.1:0",
            "CLASSMESH_LOG_LEVEL": "INFO",
            "CLASSMESH_DB_POOL_SIZE": "6",
        }
    )
    env.update(env_overrides)
    err = open(stderr_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "classmesh.cli", *(args or ("up",))],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env=env,
        cwd=str(ROOT),
    )
    mesh = MeshProcess(proc=proc)
    mesh._stderr_path = stderr_path  # type: ignore[attr-defined]
    return mesh
