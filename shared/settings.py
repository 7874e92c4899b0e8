"""Process configuration, read once from the environment.

Every variable is ``COUPON_`` and a field's name in capitals, listed in the README (a test holds
the README's table to the fields and their defaults). Defaults live here and only here. A bad
value raises :class:`ConfigError` with one clear line, at start, never at the first request.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

AUTH_MODES = ("none", "jwt")
JWT_ALGORITHMS = ("HS256", "RS256", "ES256")
# RFC 7518 3.2: an HMAC key at least as long as the hash output (256 bits for HS256).
JWT_MIN_SECRET_BYTES = 32
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


@dataclass(frozen=True, slots=True)
class MySQLDsn:
    """The parts of a ``mysql://user:password@host:port/database`` URL."""

    host: str
    port: int
    user: str
    password: str
    database: str

    @classmethod
    def parse(cls, url: str) -> MySQLDsn:
        parts = urlsplit(url)
        if parts.scheme not in ("mysql", "mariadb"):
            raise ConfigError(f"COUPON_MYSQL_URL must start with mysql://, got {parts.scheme!r}")
        database = parts.path.lstrip("/")
        if not database or not parts.hostname:
            raise ConfigError("COUPON_MYSQL_URL needs a host and a database: mysql://u:p@h:3306/db")
        if not database.replace("_", "").isalnum():
            raise ConfigError(f"COUPON_MYSQL_URL database name {database!r} must be [A-Za-z0-9_]")
        try:
            port = parts.port or 3306
        except ValueError as exc:
            raise ConfigError(f"COUPON_MYSQL_URL has a bad port: {exc}") from None
        return cls(
            host=parts.hostname,
            port=port,
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=database,
        )

    def redacted(self) -> str:
        """The URL without its password, for logs."""
        return f"mysql://{self.user}:***@{self.host}:{self.port}/{self.database}"


def redact_url(url: str) -> str:
    """A URL with any password replaced by ``***``, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def flag(raw: str) -> bool:
    """A yes/no setting: 1/true/yes/on or 0/false/no/off, in any case."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def parse_sentinels(raw: str) -> tuple[tuple[str, int], ...]:
    """``COUPON_REDIS_SENTINELS``: comma-separated ``host:port`` pairs (IPv6 in brackets)."""
    sentinels = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        host, _, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ConfigError(f"COUPON_REDIS_SENTINELS: {item!r} is not host:port")
        sentinels.append((host, int(port)))
    return tuple(sentinels)


def parse_networks(raw: str) -> tuple[IpNetwork, ...]:
    """``COUPON_TRUSTED_PROXIES``: comma-separated addresses or CIDRs (``10.0.0.0/8, ::1``)."""
    networks = []
    for item in raw.split(","):
        part = item.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=True))
        except ValueError as exc:
            raise ConfigError(f"COUPON_TRUSTED_PROXIES: {exc}") from None
    return tuple(networks)


def load_jwt_public_key(value: str, algorithm: str) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The verification key for RS256/ES256 from PEM text, or from the PEM file ``value`` names.

    Returns a ``cryptography`` public key object, so tokens are verified without parsing PEM
    per request. Raises :class:`ConfigError` naming the variable when the key is unusable.
    """
    if value.lstrip().startswith("-----BEGIN"):
        pem = value.encode()
    else:
        try:
            pem = Path(value).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"COUPON_JWT_PUBLIC_KEY: cannot read {value!r}: {exc.strerror}"
            ) from None
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise ConfigError("COUPON_JWT_PUBLIC_KEY is not a PEM public key") from None
    if algorithm == "RS256":
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
            raise ConfigError(
                "COUPON_JWT_PUBLIC_KEY must be an RSA key of 2048 bits or more for RS256"
            )
    elif not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ConfigError("COUPON_JWT_PUBLIC_KEY must be a P-256 EC key for ES256")
    return key


ADMIN_TOKEN_MIN_LENGTH = 16
ACTOR_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
DEFAULT_ADMIN_ACTOR = "admin"
"""The name the audit log records for a change made with ``COUPON_ADMIN_TOKEN``."""


def parse_admin_tokens(raw: str) -> dict[str, str]:
    """``COUPON_ADMIN_TOKENS``: comma-separated ``name:token`` pairs -> {token: name}. Names
    and tokens are unique; a token is at least :data:`ADMIN_TOKEN_MIN_LENGTH` characters."""
    actors: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        name, sep, token = item.strip().partition(":")
        if not sep or not ACTOR_NAME.fullmatch(name):
            raise ConfigError(
                "COUPON_ADMIN_TOKENS must be name:token pairs, names of 1 to 64 of"
                " A-Z a-z 0-9 . _ @ -"
            )
        if len(token) < ADMIN_TOKEN_MIN_LENGTH or any(c.isspace() for c in token):
            raise ConfigError(
                f"COUPON_ADMIN_TOKENS: the token of {name!r} must be at least"
                f" {ADMIN_TOKEN_MIN_LENGTH} characters, without spaces"
            )
        if name in actors.values() or token in actors:
            raise ConfigError(f"COUPON_ADMIN_TOKENS: {name!r} or its token appears twice")
        actors[token] = name
    return actors


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a gateway, worker or couponctl process needs to know."""

    # Fields that may hold a secret stay out of repr(), so a logged or printed Settings object
    # (a traceback, a test failure) never shows a password or token.
    redis_url: str = dataclasses.field(default="redis://127.0.0.1:6380/0", repr=False)
    redis_cluster: bool = False
    redis_sentinels: str = ""
    redis_sentinel_master: str | None = None
    redis_sentinel_password: str | None = dataclasses.field(default=None, repr=False)
    redis_min_replicas: int = 0
    redis_replica_timeout_ms: int = 250
    mysql_url: str = dataclasses.field(default="mysql://root:@127.0.0.1:3307/coupon", repr=False)
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    admin_token: str | None = dataclasses.field(default=None, repr=False)
    admin_tokens: str | None = dataclasses.field(default=None, repr=False)
    operator: str | None = None
    gateway_processes: int = 1
    workers: int = 2
    log_format: str = "auto"
    log_level: str = "info"

    # Gateway
    redis_timeout_seconds: float = 0.5
    snapshot_ttl_seconds: float = 10.0
    snapshot_cache_size: int = 10_000
    coalesce_max_batch: int = 512
    max_body_bytes: int = 4096
    listen_backlog: int = 4096
    keepalive_timeout_seconds: float = 75.0
    body_read_timeout_seconds: float = 10.0
    request_log_sample: float = 0.01
    shed_wait_target_ms: float = 500.0
    shed_wait_interval_ms: float = 1000.0
    shed_max_lag: int = 200_000
    shed_max_age_seconds: float = 120.0
    max_subscribers: int = 10_000
    feed_interval_ms: int = 250
    feed_heartbeat_seconds: float = 15.0
    feed_retry_ms: int = 2000

    # Worker
    worker_name: str = dataclasses.field(default_factory=_default_consumer_name)
    batch_size: int = 500
    block_ms: int = 1000
    reclaim_idle_ms: int = 30_000
    max_deliveries: int = 5
    discovery_interval_seconds: float = 2.0
    mysql_retry_max_seconds: float = 5.0
    shutdown_grace_seconds: float = 10.0
    worker_metrics_port: int = 0
    worker_stuck_seconds: float = 60.0
    retire_after_seconds: float = 86_400.0

    # Identity, admin listener and abuse limits (gateway)
    auth: str = "none"
    jwt_algorithm: str = "HS256"
    jwt_secret: str | None = dataclasses.field(default=None, repr=False)
    jwt_public_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_seconds: float = 0.0
    jwt_max_lifetime_seconds: float = 86_400.0
    admin_host: str = "127.0.0.1"
    admin_port: int = 0
    ops_on_admin_port: bool = False
    rate_limit_ip_per_second: float = 0.0
    rate_limit_ip_burst: int = 0
    rate_limit_user_per_second: float = 0.0
    rate_limit_user_burst: int = 0
    rate_limit_read_per_second: float = 0.0
    rate_limit_read_burst: int = 0
    rate_limit_max_keys: int = 100_000
    trusted_proxies: str = ""

    def __post_init__(self) -> None:
        MySQLDsn.parse(self.mysql_url)
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("COUPON_REDIS_URL must start with redis://, rediss:// or unix://")
        if self.admin_token is not None and len(self.admin_token) < ADMIN_TOKEN_MIN_LENGTH:
            raise ConfigError(
                f"COUPON_ADMIN_TOKEN must be at least {ADMIN_TOKEN_MIN_LENGTH} characters"
            )
        self.admin_actors  # noqa: B018 - parsed once here, so a bad value fails at start
        if self.operator is not None and not ACTOR_NAME.fullmatch(self.operator):
            raise ConfigError("COUPON_OPERATOR must be 1 to 64 of A-Z a-z 0-9 . _ @ -")
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError("COUPON_LOG_FORMAT must be auto, json or console")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("COUPON_LOG_LEVEL must be debug, info, warning or error")
        positive = {
            "COUPON_HTTP_PORT": self.http_port,
            "COUPON_GATEWAY_PROCESSES": self.gateway_processes,
            "COUPON_COALESCE_MAX_BATCH": self.coalesce_max_batch,
            "COUPON_MAX_BODY_BYTES": self.max_body_bytes,
            "COUPON_LISTEN_BACKLOG": self.listen_backlog,
            "COUPON_SNAPSHOT_CACHE_SIZE": self.snapshot_cache_size,
            "COUPON_BATCH_SIZE": self.batch_size,
            "COUPON_BLOCK_MS": self.block_ms,
            "COUPON_RECLAIM_IDLE_MS": self.reclaim_idle_ms,
            "COUPON_MAX_DELIVERIES": self.max_deliveries,
            "COUPON_MAX_SUBSCRIBERS": self.max_subscribers,
            "COUPON_FEED_INTERVAL_MS": self.feed_interval_ms,
            "COUPON_FEED_RETRY_MS": self.feed_retry_ms,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.workers < 0:
            raise ConfigError(f"COUPON_WORKERS must be 0 or more, got {self.workers}")
        if self.http_port > 65535:
            raise ConfigError(f"COUPON_HTTP_PORT must be at most 65535, got {self.http_port}")
        durations = {
            # name: (value, whether 0 is allowed)
            "COUPON_REDIS_TIMEOUT_SECONDS": (self.redis_timeout_seconds, False),
            "COUPON_SNAPSHOT_TTL_SECONDS": (self.snapshot_ttl_seconds, False),
            "COUPON_DISCOVERY_INTERVAL_SECONDS": (self.discovery_interval_seconds, False),
            "COUPON_MYSQL_RETRY_MAX_SECONDS": (self.mysql_retry_max_seconds, False),
            "COUPON_SHUTDOWN_GRACE_SECONDS": (self.shutdown_grace_seconds, True),
            "COUPON_KEEPALIVE_TIMEOUT_SECONDS": (self.keepalive_timeout_seconds, False),
            "COUPON_BODY_READ_TIMEOUT_SECONDS": (self.body_read_timeout_seconds, False),
            "COUPON_JWT_MAX_LIFETIME_SECONDS": (self.jwt_max_lifetime_seconds, False),
            "COUPON_WORKER_STUCK_SECONDS": (self.worker_stuck_seconds, False),
            "COUPON_RETIRE_AFTER_SECONDS": (self.retire_after_seconds, True),
            "COUPON_FEED_HEARTBEAT_SECONDS": (self.feed_heartbeat_seconds, False),
        }
        for name, (seconds, zero_ok) in durations.items():
            if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero_ok):
                bound = "0 or more" if zero_ok else "positive"
                raise ConfigError(f"{name} must be a finite number of seconds, {bound}")
        self._check_shedding()
        self._check_security()
        self._check_replication()

    def _check_replication(self) -> None:
        """Sentinel and replica acknowledgement (COUPON_REDIS_SENTINEL*, _MIN_REPLICAS)."""
        sentinels = self.redis_sentinel_addresses
        if sentinels and self.redis_cluster:
            raise ConfigError("COUPON_REDIS_SENTINELS and COUPON_REDIS_CLUSTER exclude each other")
        if sentinels and self.redis_url.startswith("rediss://"):
            # The Sentinel client here speaks plain TCP; a silent downgrade would send the
            # password in clear.
            raise ConfigError("COUPON_REDIS_SENTINELS does not support rediss:// (TLS) URLs")
        if sentinels and not self.redis_sentinel_master:
            raise ConfigError("COUPON_REDIS_SENTINELS needs COUPON_REDIS_SENTINEL_MASTER")
        if self.redis_sentinel_master and not sentinels:
            raise ConfigError("COUPON_REDIS_SENTINEL_MASTER needs COUPON_REDIS_SENTINELS")
        if self.redis_min_replicas < 0:
            raise ConfigError("COUPON_REDIS_MIN_REPLICAS must be 0 (off) or more")
        # WAIT must give up before the client stops listening, or every short answer from
        # the replicas would arrive as a socket timeout instead of a counted "not in time".
        if self.redis_replica_timeout_ms <= 0:
            raise ConfigError("COUPON_REDIS_REPLICA_TIMEOUT_MS must be positive")
        # WAIT's answer still needs a round trip after it gives up: keep a fifth in hand.
        if self.redis_min_replicas and (
            self.redis_replica_timeout_ms > 0.8 * self.redis_timeout_seconds * 1000
        ):
            raise ConfigError(
                "COUPON_REDIS_REPLICA_TIMEOUT_MS must be at most 80 % of"
                " COUPON_REDIS_TIMEOUT_SECONDS"
            )

    def _check_shedding(self) -> None:
        """Load-shedding thresholds (COUPON_SHED_*) and the request log's sample; 0 turns a
        threshold off."""
        if self.shed_max_lag < 0:
            raise ConfigError(f"COUPON_SHED_MAX_LAG must be 0 (off) or more: {self.shed_max_lag}")
        for name, value in (
            ("COUPON_SHED_MAX_AGE_SECONDS", self.shed_max_age_seconds),
            ("COUPON_SHED_WAIT_TARGET_MS", self.shed_wait_target_ms),
            ("COUPON_SHED_WAIT_INTERVAL_MS", self.shed_wait_interval_ms),
        ):
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be 0 (off) or more")
        if not (math.isfinite(self.request_log_sample) and 0 <= self.request_log_sample <= 1):
            raise ConfigError("COUPON_REQUEST_LOG_SAMPLE must be between 0 and 1")

    def _check_security(self) -> None:
        """Identity, admin listener and rate-limit settings (COUPON_AUTH, _JWT_*, _RATE_LIMIT_*)."""
        if self.auth not in AUTH_MODES:
            raise ConfigError(f"COUPON_AUTH must be none or jwt, got {self.auth!r}")
        if self.jwt_algorithm not in JWT_ALGORITHMS:
            raise ConfigError(f"COUPON_JWT_ALGORITHM must be one of {', '.join(JWT_ALGORITHMS)}")
        if self.auth == "jwt":
            self._check_jwt_key()
        if not math.isfinite(self.jwt_leeway_seconds) or not 0 <= self.jwt_leeway_seconds <= 300:
            raise ConfigError("COUPON_JWT_LEEWAY_SECONDS must be between 0 and 300")
        if not 0 <= self.admin_port <= 65535:
            raise ConfigError(f"COUPON_ADMIN_PORT must be 0 (off) or a port, got {self.admin_port}")
        if self.admin_port and (self.admin_host, self.admin_port) == (
            self.http_host,
            self.http_port,
        ):
            raise ConfigError("COUPON_ADMIN_PORT must differ from COUPON_HTTP_PORT on one host")
        if self.ops_on_admin_port and not self.admin_port:
            raise ConfigError("COUPON_OPS_ON_ADMIN_PORT needs COUPON_ADMIN_PORT")
        for kind in ("IP", "USER", "READ"):
            rate = getattr(self, f"rate_limit_{kind.lower()}_per_second")
            burst = getattr(self, f"rate_limit_{kind.lower()}_burst")
            if not math.isfinite(rate) or rate < 0:
                raise ConfigError(f"COUPON_RATE_LIMIT_{kind}_PER_SECOND must be 0 (off) or more")
            if burst < 0:
                raise ConfigError(f"COUPON_RATE_LIMIT_{kind}_BURST must be 0 (= the rate) or more")
        if self.rate_limit_max_keys <= 0:
            raise ConfigError("COUPON_RATE_LIMIT_MAX_KEYS must be positive")
        parse_networks(self.trusted_proxies)

    def _check_jwt_key(self) -> None:
        """jwt mode needs exactly the key its algorithm uses; refusing the other one catches a
        deployment that meant a different algorithm."""
        algorithm = self.jwt_algorithm
        if algorithm == "HS256":
            if self.jwt_public_key is not None:
                raise ConfigError("COUPON_JWT_PUBLIC_KEY is for RS256/ES256; HS256 uses a secret")
            if self.jwt_secret is None:
                raise ConfigError("COUPON_AUTH=jwt with HS256 needs COUPON_JWT_SECRET")
            if len(self.jwt_secret.encode()) < JWT_MIN_SECRET_BYTES:
                raise ConfigError(
                    f"COUPON_JWT_SECRET must be at least {JWT_MIN_SECRET_BYTES} bytes"
                )
            return
        if self.jwt_secret is not None:
            raise ConfigError(f"COUPON_JWT_SECRET is for HS256; {algorithm} uses a public key")
        if self.jwt_public_key is None:
            raise ConfigError(f"COUPON_AUTH=jwt with {algorithm} needs COUPON_JWT_PUBLIC_KEY")
        load_jwt_public_key(self.jwt_public_key, algorithm)

    @property
    def admin_actors(self) -> dict[str, str]:
        """Admin bearer token -> the name the audit log records: every ``COUPON_ADMIN_TOKENS``
        pair, and ``COUPON_ADMIN_TOKEN`` (if set) as :data:`DEFAULT_ADMIN_ACTOR`."""
        actors = parse_admin_tokens(self.admin_tokens or "")
        if self.admin_token is not None:
            if self.admin_token in actors:
                raise ConfigError("COUPON_ADMIN_TOKEN is also one of COUPON_ADMIN_TOKENS")
            actors[self.admin_token] = DEFAULT_ADMIN_ACTOR
        return actors

    @property
    def redis_sentinel_addresses(self) -> tuple[tuple[str, int], ...]:
        return parse_sentinels(self.redis_sentinels)

    @property
    def trusted_proxy_networks(self) -> tuple[IpNetwork, ...]:
        return parse_networks(self.trusted_proxies)

    @property
    def mysql(self) -> MySQLDsn:
        return MySQLDsn.parse(self.mysql_url)

    @property
    def redis_socket_timeout_worker(self) -> float:
        """Worker socket timeout: the blocking read plus generous headroom, so an idle stream's
        BLOCK returns long before redis-py would take the quiet connection for a dead one."""
        return self.block_ms / 1000 + 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``COUPON_*`` variables; unknown ones are ignored here and
        reported by the processes at start (:func:`unknown_variables`)."""
        env = os.environ if env is None else env
        kwargs: dict[str, object] = {}
        for name, (field, convert) in ENVIRONMENT.items():
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            try:
                kwargs[field] = convert(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a valid {convert.__name__}") from None
        return cls(**kwargs)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The ``COUPON_*`` variables that reproduce these settings in a child process."""
        env = {}
        for name, (field, _) in ENVIRONMENT.items():
            value = getattr(self, field)
            if value is not None:
                env[name] = str(value)
        return env

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (tests and the CLI use this)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


PREFIX = "COUPON_"

# Read by ./scripts/run and ./scripts/scale-workers only (how many processes to supervise, how
# the private Redis syncs its AOF, how many replicas it gets); no process reads them, but they
# are no typo.
RUN_SCRIPT_VARIABLES = frozenset(
    {"COUPON_MAX_WORKERS", "COUPON_REDIS_APPENDFSYNC", "COUPON_REDIS_REPLICAS"}
)

_PARSERS: dict[str, Callable[[str], object]] = {
    "str": str,
    "str | None": str,
    "int": int,
    "float": float,
    "bool": flag,
}


def variable(field_name: str) -> str:
    """The environment variable that sets a field: ``COUPON_`` and the name in capitals."""
    return PREFIX + field_name.upper()


# Every variable the processes read, with the field it sets and how it is parsed: derived
# from the fields, so a new setting is one field with its default and nothing else here.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], object]]] = {
    variable(field.name): (field.name, _PARSERS[str(field.type)])
    for field in dataclasses.fields(Settings)
}


def unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """The ``COUPON_*`` variables set in ``env`` that nothing reads: most likely a typo
    (``COUPON_BATCHSIZE``) that would otherwise leave the default in force without a word."""
    env = os.environ if env is None else env
    return sorted(
        name
        for name in env
        if name.startswith(PREFIX) and name not in ENVIRONMENT and name not in RUN_SCRIPT_VARIABLES
    )
