"""TURN in the join response: JoinSession hands every participant, in the lobby or
admitted, guests included, RTCPeerConnection ICE servers with time-limited coturn REST
credentials that verify against the shared secret; none without TURN configuration.

The credentials are checked the way coturn checks them: HMAC-SHA1 of the username with the
secret, recomputed here, and the expiry in the username; and by a real coturn (Debian's
`turnserver`, installed by tools/system_deps.sh) running the shipped configuration
deploy/k8s/turnserver.conf on loopback: it grants a relay allocation for the join's
credentials and refuses a forged or expired one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aioice import stun, turn

from classmesh.media.v1 import media_pb2
from classmesh.session.v1 import session_pb2, session_service_pb2
from classmesh_sdk import ClassMeshClient
from tests.conftest import ROOT
from tests.support.classroom import Mesh, classroom_mesh, live_class, uid

S = session_pb2
SECRET = "coturn-shared-secret-for-tests"
TTL = 900
STUN = ["stun:turn.example.test:3478"]
TURN = [
    "turn:turn.example.test:3478?transport=udp",
    "turn:turn.example.test:3478?transport=tcp",
]
TURNS = ["turns:turn.example.test:5349?transport=tcp"]
LOBBY = S.SessionSettings(lobby_enabled=True, allow_guests=True, chat_enabled=True)
TURNSERVER_CONF = ROOT / "deploy" / "k8s" / "turnserver.conf"


@pytest.fixture(scope="module")
async def turn_mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    extra = {
        # Out of configured order on purpose: entries group by scheme.
        "CLASSMESH_TURN_URLS": ",".join([TURN[0], *STUN, *TURNS, TURN[1]]),
        "CLASSMESH_TURN_SECRET": SECRET,
        "CLASSMESH_TURN_TTL_SECONDS": str(TTL),
    }
    async with classroom_mesh(
        admin_database_url, redis_url, tmp_path_factory, "turnjoin", extra
    ) as m:
        yield m


@pytest.fixture(scope="module")
async def plain_mesh(
    admin_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with classroom_mesh(admin_database_url, redis_url, tmp_path_factory, "noturn") as m:
        yield m


def _check_turn(resp: session_service_pb2.JoinSessionResponse, before: int, after: int) -> None:
    """The entries of a TURN-configured deployment, credentials verified like coturn does."""
    user = resp.participant.user_id
    assert user
    servers = list(resp.ice_servers)
    assert [list(s.urls) for s in servers] == [STUN, TURN, TURNS]
    stun, turn, turns = servers
    assert (stun.username, stun.credential) == ("", "")
    assert (turn.username, turn.credential) == (turns.username, turns.credential)
    expiry_text, _, named = turn.username.partition(":")
    assert named == user
    expiry = int(expiry_text)
    # Valid for the configured TTL from the moment of the join, not longer.
    assert before + TTL <= expiry <= after + TTL
    expected = base64.b64encode(
        hmac.new(SECRET.encode(), turn.username.encode(), hashlib.sha1).digest()
    ).decode()
    assert turn.credential == expected
    wrong = base64.b64encode(
        hmac.new(b"another secret", turn.username.encode(), hashlib.sha1).digest()
    ).decode()
    assert turn.credential != wrong
    assert resp.ice_servers_ttl.seconds == TTL and resp.ice_servers_ttl.nanos == 0
    assert resp.ice_servers_expire_time.seconds == expiry


async def _join(
    client: ClassMeshClient, **fields: object
) -> tuple[session_service_pb2.JoinSessionResponse, int, int]:
    before = int(time.time())
    resp = await client.sessions.join_session(**fields)
    return resp, before, int(time.time()) + 1


async def test_admitted_and_lobby_participants_get_verifiable_credentials(
    turn_mesh: Mesh,
) -> None:
    klass = await live_class(turn_mesh, settings=LOBBY)
    # The instructor is admitted at once.
    inst, before, after = await _join(klass.inst, session_id=klass.id)
    assert inst.status == S.PARTICIPANT_STATUS_ADMITTED
    _check_turn(inst, before, after)
    # A student waits in the lobby and gets them too (media starts the moment it is admitted).
    student = turn_mesh.client(uid("student"))
    waiting, before, after = await _join(student, session_id=klass.id)
    assert waiting.status == S.PARTICIPANT_STATUS_LOBBY
    _check_turn(waiting, before, after)
    assert waiting.ice_servers[1].username != inst.ice_servers[1].username  # per user


async def test_guests_get_credentials_for_their_guest_identity(turn_mesh: Mesh) -> None:
    klass = await live_class(turn_mesh, settings=LOBBY)
    link = (await klass.inst.sessions.get_session(session_id=klass.id)).session.join_link_token
    anon = ClassMeshClient(turn_mesh.target, token=None)
    try:
        guest, before, after = await _join(anon, join_link_token=link, display_name="Gwen")
    finally:
        await anon.close()
    assert guest.participant.guest and guest.access_token
    _check_turn(guest, before, after)


async def test_a_replayed_join_carries_fresh_credentials(turn_mesh: Mesh) -> None:
    """The stored idempotent response has no credentials: each answer mints its own."""
    klass = await live_class(turn_mesh)
    student = turn_mesh.client(uid("student"))
    first, before, _ = await _join(student, session_id=klass.id, request_id="join-once")
    again, _, after = await _join(student, session_id=klass.id, request_id="join-once")
    assert again.participant.id == first.participant.id  # the same, replayed join
    assert again.participant.connection_id == first.participant.connection_id
    _check_turn(first, before, after)
    _check_turn(again, before, after)
    stored = await turn_mesh.pool.fetchval(
        "SELECT response FROM idempotency_keys WHERE request_id = $1", "join-once"
    )
    kept = session_service_pb2.JoinSessionResponse.FromString(bytes(stored))
    assert kept.participant.id == first.participant.id
    assert list(kept.ice_servers) == [] and not kept.HasField("ice_servers_expire_time")


async def test_without_turn_configuration_the_list_is_empty(plain_mesh: Mesh) -> None:
    klass = await live_class(plain_mesh, settings=LOBBY)
    inst = await klass.inst.sessions.join_session(session_id=klass.id)
    student = await plain_mesh.client(uid("student")).sessions.join_session(session_id=klass.id)
    for resp in (inst, student):
        assert resp.participant.user_id
        assert list(resp.ice_servers) == []
        assert not resp.HasField("ice_servers_ttl")
        assert not resp.HasField("ice_servers_expire_time")
    # The same type as MediaService's GetTurnCredentials answer.
    assert inst.DESCRIPTOR.fields_by_name["ice_servers"].message_type is (
        media_pb2.IceServer.DESCRIPTOR
    )


# ------------------------------------------------------------------------ a real coturn


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """coturn with the shipped config; only what a loopback test needs is overridden
    (address, port, no TLS certificate, files in a temporary directory)."""
    exe = shutil.which("turnserver")
    assert exe, "coturn's turnserver is missing: tools/system_deps.sh installs it"
    work: Path = tmp_path_factory.mktemp("coturn")
    port = _free_udp_port()
    proc = subprocess.Popen(
        [
            exe,
            "-c",
            str(TURNSERVER_CONF),
            f"--static-auth-secret={SECRET}",
            f"--listening-port={port}",
            "--listening-ip=127.0.0.1",
            "--relay-ip=127.0.0.1",
            "--no-tls",
            "--no-dtls",
            f"--pidfile={work / 'turnserver.pid'}",
            f"--userdb={work / 'turndb'}",
            f"--log-file={work / 'turnserver.log'}",
            "--no-stdout-log",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def _allocate(server: tuple[str, int], username: str, credential: str) -> tuple[str, int]:
    """A TURN Allocate with long-term credentials (what a browser does); the relayed address."""
    transport, _ = await asyncio.wait_for(
        turn.create_turn_endpoint(asyncio.DatagramProtocol, server, username, credential), 10
    )
    try:
        relayed = transport.get_extra_info("sockname")
        return str(relayed[0]), int(relayed[1])
    finally:
        transport.close()


async def test_coturn_with_the_shipped_config_accepts_join_credentials(
    turn_mesh: Mesh, coturn: tuple[str, int]
) -> None:
    klass = await live_class(turn_mesh, settings=LOBBY)
    student = turn_mesh.client(uid("student"))
    resp = await student.sessions.join_session(session_id=klass.id)
    assert resp.status == S.PARTICIPANT_STATUS_LOBBY
    relay = resp.ice_servers[1]
    assert relay.urls[0].startswith("turn:")
    # coturn may still be starting: the first allocation gets a few tries.
    deadline = time.monotonic() + 10
    while True:
        try:
            relayed = await _allocate(coturn, relay.username, relay.credential)
            break
        except (TimeoutError, ConnectionError, stun.TransactionTimeout):
            assert time.monotonic() < deadline, "coturn did not answer"
            await asyncio.sleep(0.2)
    assert relayed[0] == "127.0.0.1" and relayed[1] > 0
    # A credential made with another secret, and an expired username, are refused.
    forged = base64.b64encode(
        hmac.new(b"another secret", relay.username.encode(), hashlib.sha1).digest()
    ).decode()
    with pytest.raises(stun.TransactionFailed, match="401"):
        await _allocate(coturn, relay.username, forged)
    expired = f"{int(time.time()) - 5}:{resp.participant.user_id}"
    signed = base64.b64encode(
        hmac.new(SECRET.encode(), expired.encode(), hashlib.sha1).digest()
    ).decode()
    with pytest.raises(stun.TransactionFailed, match="401"):
        await _allocate(coturn, expired, signed)
