"""Configuration: one frozen dataclass, read from `CLASSMESH_*` environment variables once.

Every field has a documented default; `classmesh config` prints the effective values with
secrets masked. Constructors elsewhere take explicit arguments, never the environment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Config", "ConfigError", "load_config", "default_data_dir"]


class ConfigError(ValueError):
    """An environment variable holds a value ClassMesh cannot use."""


def default_data_dir(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "classmesh")


@dataclass(frozen=True)
class Config:
    """Effective ClassMesh configuration.

    Each field maps to `CLASSMESH_<FIELD NAME IN CAPITALS>`; the README config table lists
    them. `None` for database_url/redis_url means "start the embedded server".
    """

    #: gRPC listen address of the mesh (all services share it in `classmesh up`).
    listen: str = "127.0.0.1:50051"
    #: grpc-web gateway listen address (HTTP/1.1); empty = `classmesh up` runs no gateway.
    gateway_listen: str = "127.0.0.1:8080"
    #: Origins allowed to call the gateway cross-origin, comma-separated exact
    #: `scheme://host[:port]` (empty = only pages the gateway serves itself; `*` = any).
    gateway_cors_origins: str = ""
    #: Where `classmesh serve gateway` sends each service, `session=host:port,...`;
    #: services not named go to `peer_target` (else `listen`).
    gateway_upstreams: str = ""
    #: Largest grpc-web request body in bytes (above: HTTP 413, RESOURCE_EXHAUSTED).
    gateway_max_request_bytes: int = 4_194_304
    #: Seconds a server stream may go without a message before the gateway ends it
    #: (UNAVAILABLE; clients resume with after_seq).
    gateway_stream_idle_seconds: float = 300.0
    #: Seconds a stream write may wait for a browser that does not read before the gateway
    #: cuts it (RESOURCE_EXHAUSTED SLOW_CONSUMER).
    gateway_slow_client_seconds: float = 10.0
    #: Bytes buffered per stream for a browser before writes wait for it.
    gateway_stream_buffer_bytes: int = 262_144
    #: Directory for embedded PostgreSQL/Redis data and local object storage.
    data_dir: str = field(default_factory=default_data_dir)
    #: PostgreSQL DSN; unset starts the embedded PostgreSQL under data_dir.
    database_url: str | None = None
    #: Redis URL; unset starts the embedded Redis under data_dir.
    redis_url: str | None = None
    #: Prefix of every Redis key and channel, so several deployments can share one Redis.
    redis_prefix: str = "classmesh"
    #: S3 endpoint URL (empty = AWS default endpoint resolution).
    s3_endpoint: str = ""
    #: Bucket that holds recordings.
    s3_bucket: str = "classmesh-recordings"
    #: S3 region.
    s3_region: str = "us-east-1"
    #: S3 access key id (empty = boto3 default credential chain).
    s3_access_key: str = ""
    #: S3 secret access key (secret).
    s3_secret_key: str = ""
    #: Log level: DEBUG, INFO, WARNING, ERROR.
    log_level: str = "INFO"
    #: Address other services are reached at (generated stubs); default: `listen`.
    peer_target: str = ""
    #: Size of the asyncpg pool per process.
    db_pool_size: int = 20
    #: Seconds of clock skew accepted on token exp/nbf.
    jwt_leeway_seconds: int = 60
    #: How long a stored idempotent response is replayed, in hours (at least 24).
    idempotency_ttl_hours: int = 24
    #: Requests per minute allowed per caller and method (0 disables the limiter).
    rate_limit_per_minute: int = 1200
    #: Burst above the steady rate a caller may spend at once.
    rate_limit_burst: int = 100
    #: Events buffered per live-stream subscriber before the slow-consumer policy applies.
    stream_queue_size: int = 1024
    #: Seconds a participant whose stream/heartbeat stopped stays `disconnected` before `left`.
    presence_grace_seconds: float = 30.0
    #: Seconds between the Heartbeat calls clients are told to make.
    heartbeat_interval_seconds: float = 10.0
    #: Seconds without heartbeat or open WatchSession after which a participant is `disconnected`.
    heartbeat_timeout_seconds: float = 20.0
    #: Seconds between two runs of the presence sweeper (disconnect, grace expiry).
    presence_sweep_interval_seconds: float = 2.0
    #: Deadline (s) of SessionService's call to MediaService.CreateRouter on start.
    media_call_timeout_seconds: float = 10.0
    #: Host addresses the SFU gathers ICE candidates on, comma-separated (empty = every
    #: interface but loopback, aioice's default; tests pin 127.0.0.1).
    media_ice_hosts: str = ""
    #: Encoded frames queued per media consumer; a full video queue drops to the next keyframe.
    media_consumer_queue_size: int = 64
    #: aiortc media worker processes forwarding media (0 = one per core minus one, at least 1).
    media_workers: int = 0
    #: Participants in a router above which video is paused for everyone (audio only,
    #: seed 003 graceful degradation); 0 = never.
    media_audio_only_above: int = 0
    #: Forwarding back-end of new routers: "aiortc" (media workers) or "janus" (a Janus
    #: videoroom per router, driven over Janus's HTTP API).
    media_backend: str = "aiortc"
    #: Janus HTTP API (janus back-end), e.g. http://10.0.0.5:8088/janus.
    janus_url: str = "http://127.0.0.1:8088/janus"
    #: Janus admin API (stats of the janus back-end), e.g. http://10.0.0.5:7088/admin;
    #: empty = no transport figures (bitrates, loss, jitter, RTT) in GetMediaStats.
    janus_admin_url: str = ""
    #: Janus `admin_secret` (secret).
    janus_admin_secret: str = ""
    #: STUN/TURN URLs handed to clients with TURN credentials, comma-separated (coturn).
    turn_urls: str = ""
    #: coturn `static-auth-secret` (secret): TURN REST credentials are minted with it; empty =
    #: GetTurnCredentials answers FAILED_PRECONDITION.
    turn_secret: str = ""
    #: Default lifetime (s) of TURN credentials (a request may ask for 60 s - 24 h).
    turn_ttl_seconds: int = 3600
    #: Seconds in-flight RPCs get to finish on SIGTERM.
    shutdown_grace_seconds: float = 5.0
    #: Name of the development tenant `classmesh up` creates.
    dev_tenant: str = "dev"
    #: Chat messages per minute per user (seed 000 STR-021); also the burst allowed at once.
    chat_messages_per_minute: int = 60
    #: Longest chat message in characters, after trimming (seed 000, 003).
    chat_max_length: int = 1000
    #: Days a chat message is kept; `classmesh retention run` deletes older ones (STR-018).
    chat_retention_days: int = 90
    #: Hand raises per minute per user (seed 000 STR-021); also the burst allowed at once.
    hand_raises_per_minute: int = 10
    #: Whiteboard updates per second per user (seed 000 STR-030); also the burst.
    whiteboard_updates_per_second: int = 10
    #: Largest whiteboard snapshot in bytes (seed 000 STR-028: 10 MB).
    whiteboard_max_bytes: int = 10_485_760
    #: Questions a user may ask per minute (seed 004 spam prevention); also the burst.
    questions_per_minute: int = 5
    #: Question votes per minute per user (seed 004 spam prevention); also the burst.
    question_votes_per_minute: int = 60
    #: Links (http://, www.) allowed in one question (seed 004 content filtering).
    question_max_links: int = 2
    #: Seconds between two runs of the interaction sweeper (poll auto-close, timer expiry).
    interaction_sweep_interval_seconds: float = 1.0
    #: Seconds between two runs of the breakout sweeper (rooms whose time limit ran out).
    breakout_sweep_interval_seconds: float = 1.0
    #: Events an InteractionService.Connect client may leave unacknowledged (flow control).
    connect_max_unacked: int = 1000
    #: Seconds a Connect feed with a full window waits for an ack before SLOW_CONSUMER.
    connect_ack_wait_seconds: float = 10.0
    #: Webhooks a tenant may have at once (CreateWebhook beyond: WEBHOOK_LIMIT_REACHED).
    webhook_max_per_tenant: int = 20
    #: Seconds between two passes of the webhook dispatcher when it found no work.
    webhook_poll_interval_seconds: float = 1.0
    #: Deadline (s) of one webhook POST (connect + response).
    webhook_timeout_seconds: float = 10.0
    #: Attempts of one delivery before it is dead-lettered.
    webhook_max_attempts: int = 8
    #: Retry delay after the first failed attempt (s); doubles per attempt, with jitter.
    webhook_backoff_base_seconds: float = 10.0
    #: Longest retry delay (s).
    webhook_backoff_max_seconds: float = 3600.0
    #: Let webhooks reach loopback, private, link-local and other non-public addresses
    #: (1/true; development and tests only). Off: such URLs are refused at creation and
    #: deliveries to host names resolving to them fail (server-side request forgery guard).
    webhook_allow_private: bool = False

    @property
    def effective_peer_target(self) -> str:
        return self.peer_target or self.listen

    def masked(self) -> dict[str, object]:
        """The configuration as a dict with secrets hidden (for `classmesh config`)."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value:
                value = "****"
            elif f.name in _URL_FIELDS and isinstance(value, str):
                value = _mask_url(value)
            out[f.name] = value
        return out


_SECRET_FIELDS = frozenset({"s3_secret_key", "turn_secret", "janus_admin_secret"})
_URL_FIELDS = frozenset({"database_url", "redis_url"})


def _mask_url(url: str) -> str:
    # scheme://user:password@host -> scheme://user:****@host
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    if ":" in creds:
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:****@{host}"
    return url


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from `CLASSMESH_*` variables (default: os.environ)."""
    env = os.environ if env is None else env
    kwargs: dict[str, object] = {}
    for f in dataclasses.fields(Config):
        key = "CLASSMESH_" + f.name.upper()
        if key not in env:
            continue
        raw = env[key]
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        try:
            if kind == "int":
                kwargs[f.name] = int(raw)
            elif kind == "float":
                kwargs[f.name] = float(raw)
            elif kind == "str | None":
                kwargs[f.name] = raw or None
            elif kind == "bool":
                flag = raw.strip().lower()
                if flag not in _TRUE | _FALSE:
                    raise ValueError(raw)
                kwargs[f.name] = flag in _TRUE
            else:
                kwargs[f.name] = raw
        except ValueError as exc:
            raise ConfigError(f"{key}={raw!r}: expected {kind}") from exc
    cfg = Config(**kwargs)  # type: ignore[arg-type]
    if cfg.idempotency_ttl_hours < 24:
        raise ConfigError("CLASSMESH_IDEMPOTENCY_TTL_HOURS must be at least 24")
    for name in (
        "presence_grace_seconds",
        "heartbeat_interval_seconds",
        "heartbeat_timeout_seconds",
        "presence_sweep_interval_seconds",
        "media_call_timeout_seconds",
        "media_consumer_queue_size",
        "turn_ttl_seconds",
        "chat_messages_per_minute",
        "chat_max_length",
        "chat_retention_days",
        "hand_raises_per_minute",
        "whiteboard_updates_per_second",
        "whiteboard_max_bytes",
        "questions_per_minute",
        "question_votes_per_minute",
        "interaction_sweep_interval_seconds",
        "breakout_sweep_interval_seconds",
        "connect_max_unacked",
        "connect_ack_wait_seconds",
        "gateway_max_request_bytes",
        "gateway_stream_idle_seconds",
        "gateway_slow_client_seconds",
        "gateway_stream_buffer_bytes",
        "webhook_max_per_tenant",
        "webhook_poll_interval_seconds",
        "webhook_timeout_seconds",
        "webhook_max_attempts",
        "webhook_backoff_base_seconds",
        "webhook_backoff_max_seconds",
    ):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"CLASSMESH_{name.upper()} must be positive")
    for name in ("media_workers", "media_audio_only_above"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"CLASSMESH_{name.upper()} must be 0 or more")
    if cfg.heartbeat_timeout_seconds <= cfg.heartbeat_interval_seconds:
        raise ConfigError(
            "CLASSMESH_HEARTBEAT_TIMEOUT_SECONDS must exceed CLASSMESH_HEARTBEAT_INTERVAL_SECONDS"
        )
    for url in (u.strip() for u in cfg.turn_urls.split(",")):
        if url and not url.lower().startswith(("stun:", "stuns:", "turn:", "turns:")):
            raise ConfigError(
                f"CLASSMESH_TURN_URLS: {url!r} is not a stun:, stuns:, turn: or turns: URL"
            )
    if cfg.media_backend not in {"aiortc", "janus"}:
        raise ConfigError(f"CLASSMESH_MEDIA_BACKEND={cfg.media_backend!r}: use aiortc or janus")
    if cfg.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(
            f"CLASSMESH_LOG_LEVEL={cfg.log_level!r}: use DEBUG, INFO, WARNING or ERROR"
        )
    return cfg
