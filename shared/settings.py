"""Process configuration, read once from the environment.

Every variable carries the ``COUPON_`` prefix and is listed in the README. Defaults live here and
only here. A bad value raises :class:`ConfigError` with one clear line, at start, never at the
first request.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


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


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a gateway, worker or couponctl process needs to know."""

    redis_url: str = "redis://127.0.0.1:6380/0"
    mysql_url: str = "mysql://root:@127.0.0.1:3307/coupon"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    admin_token: str | None = None
    gateway_processes: int = 1
    workers: int = 2
    log_format: str = "auto"
    log_level: str = "info"

    # Gateway
    redis_timeout_seconds: float = 0.5
    snapshot_ttl_seconds: float = 10.0
    coalesce_max_batch: int = 512
    max_body_bytes: int = 4096

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

    def __post_init__(self) -> None:
        MySQLDsn.parse(self.mysql_url)
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("COUPON_REDIS_URL must start with redis://, rediss:// or unix://")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ConfigError("COUPON_ADMIN_TOKEN must be at least 16 characters")
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError("COUPON_LOG_FORMAT must be auto, json or console")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("COUPON_LOG_LEVEL must be debug, info, warning or error")
        positive = {
            "COUPON_HTTP_PORT": self.http_port,
            "COUPON_GATEWAY_PROCESSES": self.gateway_processes,
            "COUPON_COALESCE_MAX_BATCH": self.coalesce_max_batch,
            "COUPON_MAX_BODY_BYTES": self.max_body_bytes,
            "COUPON_BATCH_SIZE": self.batch_size,
            "COUPON_BLOCK_MS": self.block_ms,
            "COUPON_RECLAIM_IDLE_MS": self.reclaim_idle_ms,
            "COUPON_MAX_DELIVERIES": self.max_deliveries,
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
        }
        for name, (seconds, zero_ok) in durations.items():
            if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero_ok):
                bound = "0 or more" if zero_ok else "positive"
                raise ConfigError(f"{name} must be a finite number of seconds, {bound}")

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
        """Build settings from ``COUPON_*`` variables; unknown ones are ignored."""
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


# Every variable the processes read, with the field it sets and how it is parsed.
ENVIRONMENT: dict[str, tuple[str, Callable[[str], object]]] = {
    "COUPON_REDIS_URL": ("redis_url", str),
    "COUPON_MYSQL_URL": ("mysql_url", str),
    "COUPON_HTTP_HOST": ("http_host", str),
    "COUPON_HTTP_PORT": ("http_port", int),
    "COUPON_ADMIN_TOKEN": ("admin_token", str),
    "COUPON_GATEWAY_PROCESSES": ("gateway_processes", int),
    "COUPON_WORKERS": ("workers", int),
    "COUPON_LOG_FORMAT": ("log_format", str),
    "COUPON_LOG_LEVEL": ("log_level", str),
    "COUPON_REDIS_TIMEOUT_SECONDS": ("redis_timeout_seconds", float),
    "COUPON_SNAPSHOT_TTL_SECONDS": ("snapshot_ttl_seconds", float),
    "COUPON_COALESCE_MAX_BATCH": ("coalesce_max_batch", int),
    "COUPON_MAX_BODY_BYTES": ("max_body_bytes", int),
    "COUPON_WORKER_NAME": ("worker_name", str),
    "COUPON_BATCH_SIZE": ("batch_size", int),
    "COUPON_BLOCK_MS": ("block_ms", int),
    "COUPON_RECLAIM_IDLE_MS": ("reclaim_idle_ms", int),
    "COUPON_MAX_DELIVERIES": ("max_deliveries", int),
    "COUPON_DISCOVERY_INTERVAL_SECONDS": ("discovery_interval_seconds", float),
    "COUPON_MYSQL_RETRY_MAX_SECONDS": ("mysql_retry_max_seconds", float),
    "COUPON_SHUTDOWN_GRACE_SECONDS": ("shutdown_grace_seconds", float),
    "COUPON_WORKER_METRICS_PORT": ("worker_metrics_port", int),
}
