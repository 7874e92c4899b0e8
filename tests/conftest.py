"""Fixtures: a real redis-server and a real MariaDB, started once per session on free ports by
pytest-redis and pytest-mysql (mirakuru underneath), and clean state for every test.

The programs and the service's MySQL account come from :mod:`tests.servers`, as for the
benchmark and fault stacks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomysql
import pytest
from aiohttp.test_utils import TestClient
from pytest_mysql import factories as mysql_factories
from pytest_redis import factories as redis_factories
from redis.asyncio import Redis

from gateway.app import create_app
from shared.coupon_requests import NewCoupon
from shared.model import Coupon
from shared.mysql.migrations import migrate
from shared.mysql.pool import create_pool
from shared.ops import coupons
from shared.redis import client as redis_client
from shared.settings import Settings
from tests import invariants
from tests.helpers import TEST_ACTOR
from tests.servers import HOST, MYSQL_PASSWORD, MYSQL_USER, create_service_user, find_binary

ADMIN_TOKEN = "test-admin-token-0123456789"

redis_proc = redis_factories.redis_proc(executable=find_binary("redis-server"), port=None)
mysql_proc = mysql_factories.mysql_proc(
    mysqld_exec=find_binary("mariadbd", "mysqld"),
    mysqld_safe=find_binary("mysqld_safe", "mariadbd-safe"),
    admin_executable=find_binary("mariadb-admin", "mysqladmin"),
    install_db=find_binary("mariadb-install-db", "mysql_install_db"),
    port=None,
    params="--skip-name-resolve --innodb-buffer-pool-size=64M --innodb-log-file-size=48M",
)

MYSQL_DATABASE = "coupon_test"


@pytest.fixture(scope="session")
def mysql_service_user(mysql_proc: Any) -> str:
    """The service's account (the deployed rights) over TCP, on every test database, made as
    root through the unix socket; the tests may also drop the databases they made."""
    create_service_user(mysql_proc.unixsocket, admin="root", may_drop=True)
    return f"mysql://{MYSQL_USER}:{MYSQL_PASSWORD}@{HOST}:{mysql_proc.port}"


@pytest.fixture(scope="session")
def base_settings(redis_proc: Any, mysql_service_user: str) -> Settings:
    """Settings pointing at the session's servers, tuned so tests never wait long."""
    return Settings(
        redis_url=f"redis://{redis_proc.host}:{redis_proc.port}/0",
        mysql_url=f"{mysql_service_user}/{MYSQL_DATABASE}",
        admin_token=ADMIN_TOKEN,
        log_format="console",
        log_level="warning",
        worker_name="test-worker",
        reclaim_idle_ms=200,
        max_deliveries=3,
        block_ms=100,
        discovery_interval_seconds=0.1,
        mysql_retry_max_seconds=0.2,
        snapshot_ttl_seconds=1.0,
    )


@pytest.fixture(scope="session")
def _migrated(base_settings: Settings) -> None:
    asyncio.run(migrate(base_settings.mysql))


@pytest.fixture
def settings(base_settings: Settings, _migrated: None) -> Settings:
    return base_settings


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    """A client on a flushed Redis."""
    client = redis_client.connect(settings.redis_url, socket_timeout=5.0)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[aiomysql.Pool]:
    """A pool on empty tables."""
    pool = await create_pool(settings.mysql, maxsize=4)
    async with pool.acquire() as conn, conn.cursor() as cur:
        for table in ("coupon_issues", "coupon_issue_dead_letters", "coupons", "admin_audit"):
            await cur.execute(f"DELETE FROM {table}")
        await conn.commit()
    yield pool
    pool.close()
    await pool.wait_closed()


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
) -> TestClient[Any, Any]:
    """The gateway app over a real socket, on clean Redis and MySQL."""
    return await aiohttp_client(create_app(settings))


CouponFactory = Callable[..., Awaitable[Coupon]]


@pytest.fixture
def make_coupon(pool: aiomysql.Pool, redis: Redis) -> CouponFactory:
    """Create a coupon through the same code path as the admin route."""

    async def make(
        total: int | None = 100,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        title: str = "drop",
    ) -> Coupon:
        now = datetime.now(UTC)
        new = NewCoupon(
            title=title,
            total_quantity=total,
            discount_amount=1000,
            min_available_amount=10000,
            date_issue_start=start or now - timedelta(minutes=1),
            date_issue_end=end or now + timedelta(hours=1),
        )
        return await coupons.create_coupon(pool, redis, new, actor=TEST_ACTOR)

    return make


@pytest.fixture
def check_invariants(pool: aiomysql.Pool, redis: Redis) -> invariants.Checker:
    return invariants.Checker(pool, redis)
