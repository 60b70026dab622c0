"""Janus (Debian `janus`) in a private network namespace, for the Janus back-end's tests and
the SFU benchmark.

`janus_in_netns(workdir)` creates the namespace (tests/support/netns.py), renders ClassMesh's
Janus configuration into `workdir` (only the videoroom plugin and the HTTP transport; ICE on
the namespace's veth only; HTTP and admin API on the inside address), starts Janus inside,
waits until `GET /janus/info` answers, and on exit stops Janus and deletes the namespace.

The mesh reaches Janus at `JanusServer.url` from the root namespace; aiortc peers pin their
ICE host candidates to `JanusServer.netns.outside_ip` (see netns.py for why).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from classmesh.media.janus.config import JanusConfig, render_config
from tests.support.netns import Netns, private_netns

__all__ = ["JanusServer", "janus_in_netns", "JANUS_BIN"]

JANUS_BIN = "/usr/bin/janus"


@dataclass
class JanusServer:
    netns: Netns
    proc: subprocess.Popen[bytes]
    url: str
    admin_url: str
    admin_secret: str
    log_path: Path
    conf_dir: Path

    @property
    def pid(self) -> int:
        """Janus's own pid (`ip netns exec` execs it, so the Popen's pid is Janus)."""
        return self.proc.pid

    def env(self) -> dict[str, str]:
        """The mesh's configuration for this Janus."""
        return {
            "CLASSMESH_MEDIA_BACKEND": "janus",
            "CLASSMESH_JANUS_URL": self.url,
            "CLASSMESH_JANUS_ADMIN_URL": self.admin_url,
            "CLASSMESH_JANUS_ADMIN_SECRET": self.admin_secret,
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def restart(self, *, kill: bool = True) -> None:
        """Stop Janus (SIGKILL: a crash) and start it again with the same configuration:
        a new Janus that knows none of the old sessions, rooms or handles."""
        if kill and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.stop()
        self.proc = _spawn(self.netns, self.conf_dir, self.log_path)
        _wait_ready(self)

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/info", timeout=1) as response:
            return bool(json.loads(response.read()).get("janus") == "server_info")
    except (OSError, ValueError, urllib.error.URLError):
        return False


@contextlib.contextmanager
def janus_in_netns(workdir: Path, *, debug_level: int = 4) -> Iterator[JanusServer]:
    if shutil.which(JANUS_BIN) is None:
        raise RuntimeError(f"{JANUS_BIN} is missing: install Debian's janus (tools/system_deps.sh)")
    with private_netns() as ns:
        secret = secrets.token_hex(12)
        conf_dir = workdir / "janus-conf"
        render_config(
            conf_dir,
            JanusConfig(
                http_ip=ns.inside_ip,
                admin_secret=secret,
                ice_enforce_list=ns.inside_if,
                debug_level=debug_level,
            ),
        )
        log_path = workdir / "janus.log"
        server = JanusServer(
            netns=ns,
            proc=_spawn(ns, conf_dir, log_path),
            url=f"http://{ns.inside_ip}:8088/janus",
            admin_url=f"http://{ns.inside_ip}:7088/admin",
            admin_secret=secret,
            log_path=log_path,
            conf_dir=conf_dir,
        )
        try:
            _wait_ready(server)
            yield server
        finally:
            server.stop()


def _spawn(ns: Netns, conf_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            ns.argv([JANUS_BIN, "-F", str(conf_dir), "-C", str(conf_dir / "janus.jcfg"), "-o"]),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_ready(server: JanusServer) -> None:
    deadline = time.monotonic() + 20
    while not _answers(server.url):
        if server.proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(
                f"Janus did not start in namespace {server.netns.name} "
                f"(exit {server.proc.poll()}):\n{server.log_tail()}"
            )
        time.sleep(0.1)
