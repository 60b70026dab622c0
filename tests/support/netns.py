"""A private network namespace joined to this one by a veth pair, for media tests.

Why: Janus (libnice) never gathers ICE candidates on loopback, so Janus cannot be tested on
127.0.0.1 the way the aiortc back-end is. A namespace of our own gives it an interface with
an address that exists only on this machine and only for the test:

    root namespace                         namespace cmj-<pid>-<n>
    <outside_if> 10.213.K.2/30  <--veth-->  <inside_if> 10.213.K.1/30  (+ lo, up)

Janus runs inside (`ip netns exec`), gathers candidates on `inside_if` only, and serves its
HTTP API on the inside address. The mesh, the aiortc test peers and Chromium stay in the
root namespace and reach Janus over the veth: aiortc peers pin their host candidates to the
outside address (aioice would otherwise offer every interface), so every ICE pair is
veth <-> veth and nothing leaves the machine.

Creating a namespace needs CAP_NET_ADMIN: without it `NetnsUnavailable` is raised with the
command's own error, and the test using it fails (it must not skip: the Janus back-end would
be untested without anyone noticing).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["Netns", "NetnsUnavailable", "private_netns"]

PREFIX = "cmj"
#: Third octet range of the /30 subnets (10.213.K.0/30) the harness picks from.
SUBNETS = range(1, 250)


class NetnsUnavailable(RuntimeError):
    """This machine (or this user) cannot create network namespaces."""


@dataclass(frozen=True)
class Netns:
    name: str
    inside_if: str
    outside_if: str
    inside_ip: str
    outside_ip: str

    def argv(self, command: Sequence[str]) -> list[str]:
        """`command` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *command]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    except FileNotFoundError as exc:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed") from exc
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(
            done.returncode, ["ip", *args], done.stdout, done.stderr
        )
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale() -> None:
    """Delete namespaces this harness left behind in runs whose process is gone."""
    listed = _ip("netns", "list", check=False).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == PREFIX and parts[1].isdigit():
            if not _alive(int(parts[1])):
                _ip("netns", "del", name, check=False)


def _used_subnets() -> set[int]:
    used: set[int] = set()
    for line in _ip("-4", "-o", "addr", check=False).stdout.splitlines():
        for word in line.split():
            if word.startswith("10.213."):
                with contextlib.suppress(ValueError, IndexError):
                    used.add(int(word.split(".")[2]))
    return used


_counter = 0


@contextlib.contextmanager
def private_netns() -> Iterator[Netns]:
    """A fresh namespace + veth pair with a free 10.213.K.0/30; deleted on exit."""
    global _counter
    _counter += 1
    pid = os.getpid()
    name = f"{PREFIX}-{pid}-{_counter}"
    # Interface names are at most 15 characters.
    tag = f"{pid % 100000}{_counter % 100}"
    inside_if, outside_if = f"{PREFIX}{tag}i", f"{PREFIX}{tag}o"
    _remove_stale()
    done = _ip("netns", "add", name, check=False)
    if done.returncode != 0:
        raise NetnsUnavailable(
            f"cannot create a network namespace (`ip netns add {name}` failed: "
            f"{done.stderr.strip() or done.returncode}); the Janus back-end test needs "
            "CAP_NET_ADMIN (run as root or in a container with --cap-add NET_ADMIN)"
        )
    try:
        free = [k for k in SUBNETS if k not in _used_subnets()]
        if not free:
            raise NetnsUnavailable("no free 10.213.K.0/30 subnet for the test namespace")
        k = free[(pid + _counter) % len(free)]
        ns = Netns(name, inside_if, outside_if, f"10.213.{k}.1", f"10.213.{k}.2")
        _ip("link", "add", outside_if, "type", "veth", "peer", "name", inside_if)
        _ip("link", "set", inside_if, "netns", name)
        _ip("addr", "add", f"{ns.outside_ip}/30", "dev", outside_if)
        _ip("link", "set", outside_if, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{ns.inside_ip}/30", "dev", inside_if)
        _ip("netns", "exec", name, "ip", "link", "set", inside_if, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
    except BaseException as exc:
        _delete(name, outside_if)
        if isinstance(exc, subprocess.CalledProcessError):
            raise NetnsUnavailable(
                f"setting up the test namespace failed: {' '.join(exc.cmd)}: "
                f"{(exc.stderr or '').strip()}"
            ) from exc
        raise
    try:
        yield ns
    finally:
        _delete(name, outside_if)


def _delete(name: str, outside_if: str) -> None:
    # Deleting the namespace deletes the inside end, and with it the whole veth pair.
    _ip("netns", "del", name, check=False)
    _ip("link", "del", outside_if, check=False)
