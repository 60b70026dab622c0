"""core/turn.py: coturn REST credentials and the ICE server entries built from config."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import replace

import pytest

from classmesh.core.config import ConfigError, load_config
from classmesh.core.turn import IceServerEntry, mint_ice_servers

NOW = 1_700_000_000


def _reference(secret: str, username: str) -> str:
    # What coturn computes for `use-auth-secret`.
    return base64.b64encode(
        hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    ).decode()


def test_entries_group_stun_turn_and_turns_with_one_credential() -> None:
    cfg = load_config(
        {
            "CLASSMESH_TURN_URLS": "turns:t:5349?transport=tcp, stun:t:3478,"
            "turn:t:3478?transport=udp,,turn:t:3478?transport=tcp",
            "CLASSMESH_TURN_SECRET": "s3cret",
            "CLASSMESH_TURN_TTL_SECONDS": "600",
        }
    )
    grant = mint_ice_servers(cfg, "alice", now=NOW)
    assert (grant.username, grant.ttl_seconds, grant.expires_at) == (
        "1700000600:alice",
        600,
        NOW + 600,
    )
    assert grant.credential == _reference("s3cret", "1700000600:alice")
    assert grant.has_turn
    assert grant.ice_servers == (
        IceServerEntry(urls=("stun:t:3478",)),
        IceServerEntry(
            urls=("turn:t:3478?transport=udp", "turn:t:3478?transport=tcp"),
            username="1700000600:alice",
            credential=grant.credential,
        ),
        IceServerEntry(
            urls=("turns:t:5349?transport=tcp",),
            username="1700000600:alice",
            credential=grant.credential,
        ),
    )
    assert grant.urls == (
        "turns:t:5349?transport=tcp",
        "stun:t:3478",
        "turn:t:3478?transport=udp",
        "turn:t:3478?transport=tcp",
    )
    # A requested lifetime wins over the default; another user gets another credential.
    other = mint_ice_servers(cfg, "bob", ttl=60, now=NOW)
    assert (other.username, other.expires_at) == (f"{NOW + 60}:bob", NOW + 60)
    assert other.credential == _reference("s3cret", other.username) != grant.credential


def test_without_a_secret_only_stun_is_handed_out() -> None:
    cfg = load_config({"CLASSMESH_TURN_URLS": "stun:t:3478,turn:t:3478?transport=udp"})
    grant = mint_ice_servers(cfg, "alice", now=NOW)
    assert (grant.username, grant.credential) == ("", "")
    assert not grant.has_turn
    assert grant.ice_servers == (IceServerEntry(urls=("stun:t:3478",)),)


def test_nothing_configured_is_an_empty_list() -> None:
    grant = mint_ice_servers(load_config({}), "alice", now=NOW)
    assert grant.ice_servers == () and grant.urls == () and not grant.has_turn
    # A secret without URLs still gives no entry.
    grant = mint_ice_servers(replace(load_config({}), turn_secret="s"), "alice", now=NOW)
    assert grant.ice_servers == () and not grant.has_turn


def test_at_most_ten_urls() -> None:
    urls = ",".join(f"turn:t{i}:3478" for i in range(12))
    cfg = load_config({"CLASSMESH_TURN_URLS": urls, "CLASSMESH_TURN_SECRET": "s"})
    grant = mint_ice_servers(cfg, "alice", now=NOW)
    assert len(grant.urls) == 10 and grant.urls[-1] == "turn:t9:3478"
    assert [len(e.urls) for e in grant.ice_servers] == [10]


@pytest.mark.parametrize("bad", ["http://turn.example.com", "turn.example.com:3478"])
def test_config_refuses_urls_that_are_not_stun_or_turn(bad: str) -> None:
    with pytest.raises(ConfigError, match="CLASSMESH_TURN_URLS"):
        load_config({"CLASSMESH_TURN_URLS": f"stun:ok:3478,{bad}"})
