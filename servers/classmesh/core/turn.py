"""STUN/TURN for clients: time-limited coturn credentials and ready-made ICE servers.

coturn's TURN REST scheme (`use-auth-secret` + `static-auth-secret`): the username is
`"<expiry unix time>:<user id>"`, the credential `base64(HMAC-SHA1(secret, username))`; coturn
recomputes the HMAC and refuses a username whose expiry has passed, so nothing is stored.

Configuration (core/config.py): `turn_urls` lists every STUN and TURN URL clients should use
(`stun:`/`stuns:` without credentials; `turn:` with `?transport=udp` / `?transport=tcp`, and
`turns:` for TURN over TLS), `turn_secret` the shared secret, `turn_ttl_seconds` the default
lifetime. TURN entries are handed out only with a secret; STUN URLs always.

`mint_ice_servers` is the one place credentials are minted: MediaService.GetTurnCredentials
and SessionService.JoinSession both call it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

from classmesh.core.config import Config

__all__ = [
    "ICE_SCHEMES",
    "MAX_ICE_URLS",
    "IceServerEntry",
    "TurnGrant",
    "ice_urls",
    "mint_ice_servers",
    "turn_credential",
]

#: URL schemes of RFC 7064/7065 (STUN, STUN over TLS, TURN, TURN over TLS).
ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")
#: URLs handed to a client at most (RTCPeerConnection needs few; the API says 1-10).
MAX_ICE_URLS = 10


@dataclass(frozen=True)
class IceServerEntry:
    """One RTCPeerConnection `iceServers` entry; username/credential empty for STUN."""

    urls: tuple[str, ...]
    username: str = ""
    credential: str = ""


@dataclass(frozen=True)
class TurnGrant:
    """What a client gets: credentials (empty without a secret), lifetime, URLs, entries."""

    #: `"<expiry>:<user>"`; empty when no TURN secret is configured.
    username: str
    #: base64 HMAC-SHA1 of username with the secret; empty without a secret.
    credential: str
    #: Lifetime granted, seconds.
    ttl_seconds: int
    #: Unix time the credentials stop working.
    expires_at: int
    #: Every configured STUN/TURN URL, at most MAX_ICE_URLS, in configured order.
    urls: tuple[str, ...]
    #: STUN entry, then TURN (udp/tcp) and TURNS entries with the credentials; TURN entries
    #: only when a secret is configured; empty when nothing is configured.
    ice_servers: tuple[IceServerEntry, ...]

    @property
    def has_turn(self) -> bool:
        """True when the entries include TURN relays (credentials are in use)."""
        return any(entry.username for entry in self.ice_servers)


def ice_urls(config: Config) -> tuple[str, ...]:
    """The configured STUN/TURN URLs (blank items dropped), at most MAX_ICE_URLS."""
    urls = [u.strip() for u in config.turn_urls.split(",") if u.strip()]
    return tuple(urls[:MAX_ICE_URLS])


def turn_credential(secret: str, username: str) -> str:
    """coturn's REST credential: base64(HMAC-SHA1(secret, username))."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() + ":"


def mint_ice_servers(
    config: Config, user_id: str, *, ttl: int | None = None, now: float | None = None
) -> TurnGrant:
    """Mint credentials for `user_id` valid `ttl` seconds (default config.turn_ttl_seconds)
    from `now` (default the clock), and the ICE server entries of the configured URLs."""
    lifetime = ttl if ttl is not None else config.turn_ttl_seconds
    expires_at = int(now if now is not None else time.time()) + lifetime
    urls = ice_urls(config)
    username = credential = ""
    if config.turn_secret:
        username = f"{expires_at}:{user_id}"
        credential = turn_credential(config.turn_secret, username)
    stun = tuple(u for u in urls if _scheme(u) in ("stun:", "stuns:"))
    turn = tuple(u for u in urls if _scheme(u) == "turn:")
    turns = tuple(u for u in urls if _scheme(u) == "turns:")
    entries: list[IceServerEntry] = []
    if stun:
        entries.append(IceServerEntry(urls=stun))
    if credential:
        for group in (turn, turns):
            if group:
                entries.append(IceServerEntry(urls=group, username=username, credential=credential))
    return TurnGrant(
        username=username,
        credential=credential,
        ttl_seconds=lifetime,
        expires_at=expires_at,
        urls=urls,
        ice_servers=tuple(entries),
    )
