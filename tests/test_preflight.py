"""``couponctl preflight ID`` and the worker heartbeat it counts.

Every test runs on a private redis-server (tests/servers.py): by default one with the shipped
durability (AOF on, ``appendfsync always``, ``noeviction``) and a 256 MB ``maxmemory``; tests
about other Redis configurations (AOF off, an evicting policy, a small ``maxmemory``, CONFIG
disabled) start one of their own. MySQL is the session's MariaDB. couponctl runs as a real
subprocess; the heartbeat is written by real workers (a ``python -m stream_worker`` process, or
a :class:`Worker` loop with its :class:`Heartbeat` in this process).
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomysql
import orjson
import pytest
from redis.asyncio import Redis

from shared import keys
from shared.ops.preflight import ACCEPTED_REQUEST_BYTES, WORKER_FRESH_SECONDS
from shared.redis.scripts import HEARTBEAT_KEEP_MS, IssueResult, Scripts
from shared.redis.streams import redis_now_ms
from shared.settings import Settings
from stream_worker.heartbeat import Heartbeat
from stream_worker.worker import Worker
from tests.conftest import CouponFactory
from tests.helpers import child_env, couponctl, drain, wait_for
from tests.servers import REPO, RedisServer

CHECKS = [
    "redis_durability",
    "redis_memory",
    "workers",
    "mysql",
    "redis_state",
    "window",
    "coupon",
]
EXIT_NOT_READY = 6
DURABLE_MAXMEMORY = "256mb"
TEST_BEAT_SECONDS = 0.05


def _start_redis(workdir: Path, *options: str) -> RedisServer:
    """A private redis-server: AOF on, ``noeviction``, then ``options``, which override those
    (redis-server takes the last value given for a directive)."""
    server = RedisServer(workdir)
    assert server.executor.command_parts is server.command  # the options reach the executor
    server.command.extend(options)
    server.start()
    return server


@pytest.fixture(scope="module")
def durable_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = _start_redis(tmp_path_factory.mktemp("redis"), "--maxmemory", DURABLE_MAXMEMORY)
    yield server
    server.close()


@pytest.fixture
def redis_server(
    request: pytest.FixtureRequest, durable_server: RedisServer, tmp_path: Path
) -> Iterator[RedisServer]:
    """The Redis the test runs on: the durable one, or one started with the options an
    indirect parametrisation gives."""
    options = getattr(request, "param", None)
    if options is None:
        yield durable_server
        return
    server = _start_redis(tmp_path, *options)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def settings(base_settings: Settings, _migrated: None, redis_server: RedisServer) -> Settings:
    """The session's settings on this module's Redis (conftest's ``redis``, ``pool`` and
    ``make_coupon`` then work on it)."""
    return base_settings.replace(redis_url=redis_server.url)


@pytest.fixture
async def live_worker(
    redis: Redis, pool: aiomysql.Pool, settings: Settings
) -> AsyncIterator[Heartbeat]:
    """A real worker loop turning in this process, its heartbeat refreshed every 50 ms."""
    worker = Worker(redis, pool, settings)
    heartbeat = Heartbeat(
        redis,
        worker.name,
        worker.seconds_since_turn,
        stuck_after_seconds=settings.worker_stuck_seconds,
        interval=TEST_BEAT_SECONDS,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run())
    beating = asyncio.create_task(heartbeat.run(stop))
    try:
        await wait_for(lambda: _member(redis, worker.name))
        yield heartbeat
    finally:
        worker.stop()
        await running
        stop.set()
        await beating


async def _member(redis: Redis, name: str) -> bool:
    return await redis.zscore(keys.WORKERS, name) is not None


async def _preflight(
    settings: Settings, coupon_id: int, env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, dict[str, str]], str]:
    """(exit code, the JSON report, its checks by name, stderr)."""
    code, out, err = await couponctl(settings, "preflight", str(coupon_id), "--json", env=env)
    report = orjson.loads(out)
    return code, report, {check["name"]: check for check in report["checks"]}, err


def _statuses(checks: dict[str, dict[str, str]]) -> dict[str, str]:
    return {name: check["status"] for name, check in checks.items()}


def _later(minutes: float) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


async def _future_coupon(make_coupon: CouponFactory, total: int | None = 100) -> Any:
    """A coupon whose window opens in ten minutes: the usual moment of a preflight."""
    return await make_coupon(total=total, start=_later(10), end=_later(70))


# -- ready -------------------------------------------------------------------------------------


async def test_ready_with_a_worker_process_then_not_once_it_stopped(
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    tmp_path: Path,
) -> None:
    coupon = await _future_coupon(make_coupon)
    worker_settings = settings.replace(worker_name="preflight-worker")
    with (tmp_path / "worker.log").open("wb") as log:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stream_worker",
            cwd=REPO, env=child_env(worker_settings), stdout=log, stderr=log,
        )  # fmt: skip
    try:
        await wait_for(lambda: _member(redis, "preflight-worker"), within=30)

        code, out, err = await couponctl(settings, "preflight", str(coupon.id))
        assert code == 0, (out, err)
        *lines, verdict = out.splitlines()
        assert verdict == f"ready: coupon {coupon.id}'s drop can start"
        assert [line.split()[:2] for line in lines] == [[name, "ok"] for name in CHECKS]
        assert "AOF on (appendfsync always), maxmemory-policy noeviction" in lines[0]
        assert "1 alive" in lines[2]
        assert "preflight-worker" in lines[2]
        assert "starts in 9 min" in lines[5] or "starts in 10 min" in lines[5]
        assert "100 of 100 left" in lines[6]

        code, report, checks, err = await _preflight(settings, coupon.id)
        assert code == 0, err
        assert report["ready"] is True
        assert set(_statuses(checks).values()) == {"ok"}

        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 30) == 0
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    # A clean stop removes the worker's member at once.
    assert not await _member(redis, "preflight-worker")
    code, report, checks, err = await _preflight(settings, coupon.id)
    assert code == EXIT_NOT_READY, err
    assert report["ready"] is False
    assert checks["workers"]["status"] == "fail"
    assert "0 alive" in checks["workers"]["detail"]
    assert "none in the last hour" in checks["workers"]["detail"]
    assert err.strip() == f"couponctl: preflight: coupon {coupon.id} is not ready (workers failed)"


async def test_json_report_shape(
    settings: Settings, make_coupon: CouponFactory, live_worker: Heartbeat
) -> None:
    coupon = await _future_coupon(make_coupon)
    for args in (
        ["--json", "preflight", str(coupon.id)],
        ["preflight", str(coupon.id), "--json"],
    ):
        code, out, err = await couponctl(settings, *args)
        assert code == 0, (args, err)
        report = orjson.loads(out)
        assert set(report) == {"coupon_id", "ready", "checks"}
        assert report["coupon_id"] == coupon.id
        assert report["ready"] is True
        assert [check["name"] for check in report["checks"]] == CHECKS
        for check in report["checks"]:
            assert set(check) == {"name", "status", "detail"}
            assert check["status"] in ("ok", "warn", "fail")
            assert isinstance(check["detail"], str)
            assert check["detail"]


async def test_window_in_utc_and_in_the_local_time_zone(
    settings: Settings, make_coupon: CouponFactory, live_worker: Heartbeat
) -> None:
    start = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    coupon = await make_coupon(total=5, start=start, end=start + timedelta(hours=1))
    code, _, checks, err = await _preflight(settings, coupon.id, env={"TZ": "Asia/Seoul"})
    assert code == 0, err
    detail = checks["window"]["detail"]
    seoul = start + timedelta(hours=9)  # KST has no daylight saving time
    assert f"{start:%Y-%m-%d %H:%M:%S} UTC" in detail, detail
    assert f"local {seoul:%Y-%m-%d %H:%M:%S} KST" in detail, detail
    assert detail.startswith(("starts in 1 h 59 min", "starts in 2 h 0 min")), detail


async def test_open_now_warns_but_the_drop_may_go_on(
    settings: Settings, make_coupon: CouponFactory, live_worker: Heartbeat
) -> None:
    coupon = await make_coupon(total=5)  # opened a minute ago
    code, report, checks, err = await _preflight(settings, coupon.id)
    assert code == 0, err
    assert report["ready"] is True
    assert checks["window"]["status"] == "warn"
    assert "the drop has already started" in checks["window"]["detail"]


async def test_unlimited_coupon_memory_cannot_be_estimated(
    settings: Settings, make_coupon: CouponFactory, live_worker: Heartbeat
) -> None:
    coupon = await _future_coupon(make_coupon, total=None)
    code, _, checks, err = await _preflight(settings, coupon.id)
    assert code == 0, err
    assert checks["redis_memory"]["status"] == "warn"
    assert "unlimited coupon" in checks["redis_memory"]["detail"]
    assert _statuses(checks)["coupon"] == "ok"
    assert "unlimited stock" in checks["coupon"]["detail"]


@pytest.mark.parametrize("redis_server", [("--rename-command", "CONFIG", "")], indirect=True)
async def test_works_without_config_and_warns_on_unbounded_memory(
    redis: Redis, settings: Settings, make_coupon: CouponFactory, live_worker: Heartbeat
) -> None:
    coupon = await _future_coupon(make_coupon)
    code, _, checks, err = await _preflight(settings, coupon.id)
    assert code == 0, err  # warnings only
    assert checks["redis_durability"]["status"] == "ok"
    assert "appendfsync not readable" in checks["redis_durability"]["detail"]
    assert checks["redis_memory"]["status"] == "warn"
    assert "maxmemory 0 (unbounded" in checks["redis_memory"]["detail"]


# -- each failed check: exit 6 with the reason -------------------------------------------------


async def _not_ready(settings: Settings, coupon_id: int, check: str) -> str:
    """Preflight exits 6 because of ``check`` (and only it); its detail."""
    code, report, checks, err = await _preflight(settings, coupon_id)
    assert code == EXIT_NOT_READY, err
    assert report["ready"] is False
    assert [name for name, status in _statuses(checks).items() if status == "fail"] == [check]
    assert f"({check} failed)" in err
    return checks[check]["detail"]


async def test_no_worker_heartbeat(
    redis: Redis, settings: Settings, make_coupon: CouponFactory
) -> None:
    coupon = await _future_coupon(make_coupon)
    assert "0 alive" in await _not_ready(settings, coupon.id, "workers")
    # A worker killed without a clean stop leaves a member that goes stale.
    now_ms = await redis_now_ms(redis)
    await redis.zadd(keys.WORKERS, {"killed-worker": now_ms - 125_000})
    detail = await _not_ready(settings, coupon.id, "workers")
    assert "the last was killed-worker 2 min ago" in detail, detail
    assert f"within {WORKER_FRESH_SECONDS:g} s" in detail


@pytest.mark.parametrize("redis_server", [("--appendonly", "no")], indirect=True)
async def test_aof_off(
    settings: Settings, make_coupon: CouponFactory, live_worker: Heartbeat
) -> None:
    coupon = await _future_coupon(make_coupon)
    detail = await _not_ready(settings, coupon.id, "redis_durability")
    assert "AOF is off" in detail


@pytest.mark.parametrize(
    "redis_server", [("--maxmemory-policy", "allkeys-lru", "--maxmemory", "256mb")], indirect=True
)
async def test_evicting_policy(
    settings: Settings, make_coupon: CouponFactory, live_worker: Heartbeat
) -> None:
    coupon = await _future_coupon(make_coupon)
    detail = await _not_ready(settings, coupon.id, "redis_durability")
    assert "maxmemory-policy allkeys-lru" in detail


@pytest.mark.parametrize("redis_server", [("--maxmemory", "2mb")], indirect=True)
async def test_too_little_memory_for_the_stock(
    settings: Settings, make_coupon: CouponFactory, live_worker: Heartbeat
) -> None:
    big = await _future_coupon(make_coupon, total=1_000_000)
    detail = await _not_ready(settings, big.id, "redis_memory")
    assert "raise maxmemory" in detail
    assert f"1000000 requests x {ACCEPTED_REQUEST_BYTES} B x 2" in detail
    # The same Redis holds a small drop.
    small = await _future_coupon(make_coupon, total=10)
    code, _, checks, err = await _preflight(settings, small.id)
    assert code == 0, err
    assert checks["redis_memory"]["status"] == "ok"


async def test_paused(
    settings: Settings, make_coupon: CouponFactory, live_worker: Heartbeat
) -> None:
    coupon = await _future_coupon(make_coupon)
    code, _, err = await couponctl(settings, "coupon", "pause", str(coupon.id))
    assert code == 0, err
    assert "resume it before the start" in await _not_ready(settings, coupon.id, "coupon")


async def test_sold_out(
    redis: Redis, settings: Settings, make_coupon: CouponFactory, live_worker: Heartbeat
) -> None:
    coupon = await make_coupon(total=2)  # open now: a warning, not a failure
    outcome = await Scripts(redis).reserve(coupon.id, [1, 2])
    assert [r.result for r in outcome.reservations] == [IssueResult.ACCEPTED] * 2
    assert "sold out: 0 of 2 left" in await _not_ready(settings, coupon.id, "coupon")


async def test_ended(
    settings: Settings, make_coupon: CouponFactory, live_worker: Heartbeat
) -> None:
    now = datetime.now(UTC)
    coupon = await make_coupon(start=now - timedelta(hours=2), end=now - timedelta(hours=1))
    detail = await _not_ready(settings, coupon.id, "window")
    assert detail.startswith(("ended 1 h 0 min ago", "ended 59 min ago")), detail


async def test_redis_state_lost_missing_or_differing(
    redis: Redis, settings: Settings, make_coupon: CouponFactory, live_worker: Heartbeat
) -> None:
    coupon = await _future_coupon(make_coupon)
    meta = keys.CouponKeys(coupon.id).meta
    await redis.hset(meta, "total", 90)
    detail = await _not_ready(settings, coupon.id, "redis_state")
    assert "differs from MySQL in total_quantity" in detail, detail
    await redis.delete(meta)
    assert "has no Redis snapshot" in await _not_ready(settings, coupon.id, "redis_state")
    await redis.delete(keys.STATE_MARKER)
    assert "Redis lost the coupon state" in await _not_ready(settings, coupon.id, "redis_state")


async def test_not_found_and_unreachable(settings: Settings, make_coupon: CouponFactory) -> None:
    code, out, err = await couponctl(settings, "preflight", "424242")
    assert (code, out) == (4, ""), err
    assert err.strip() == "couponctl: coupon 424242 does not exist"
    coupon = await _future_coupon(make_coupon)
    unreachable = settings.replace(redis_url="redis://127.0.0.1:1/0")
    code, out, err = await couponctl(unreachable, "preflight", str(coupon.id))
    assert (code, out) == (5, ""), err
    assert err.startswith("couponctl: cannot reach a server"), err


# -- the heartbeat -----------------------------------------------------------------------------


async def test_heartbeat_written_while_the_loop_turns_removed_at_clean_stop(
    redis: Redis, pool: aiomysql.Pool, settings: Settings
) -> None:
    worker = Worker(redis, pool, settings)
    heartbeat = Heartbeat(
        redis,
        worker.name,
        worker.seconds_since_turn,
        stuck_after_seconds=settings.worker_stuck_seconds,
        interval=TEST_BEAT_SECONDS,
    )
    stop = asyncio.Event()
    beating = asyncio.create_task(heartbeat.run(stop))
    running: asyncio.Task[None] | None = None
    try:
        # Before the loop's first turn: silent.
        await wait_for(lambda: _true(heartbeat.skipped >= 3))
        assert heartbeat.beats == 0
        assert not await _member(redis, worker.name)

        started_ms = await redis_now_ms(redis)
        running = asyncio.create_task(worker.run())
        await wait_for(lambda: _member(redis, worker.name))
        first = await redis.zscore(keys.WORKERS, worker.name)
        assert first is not None
        assert started_ms <= first <= await redis_now_ms(redis)  # scored on Redis time
        # Refreshed while the loop turns.
        await wait_for(lambda: _score_above(redis, worker.name, first))
    finally:
        worker.stop()
        if running is not None:
            await running
        stop.set()
        await beating
    assert not await _member(redis, worker.name)


async def test_heartbeat_silent_once_the_loop_stopped_turning(
    redis: Redis, pool: aiomysql.Pool, settings: Settings
) -> None:
    worker = Worker(redis, pool, settings)
    stuck_after = 0.05
    heartbeat = Heartbeat(
        redis, worker.name, worker.seconds_since_turn, stuck_after_seconds=stuck_after
    )
    assert not await heartbeat.beat()  # not turned yet
    await worker.run(burst=True)  # turns, then returns: the loop no longer turns
    await wait_for(lambda: _true((worker.seconds_since_turn() or 0) > stuck_after))
    assert not await heartbeat.beat()
    assert not await _member(redis, worker.name)
    assert (heartbeat.beats, heartbeat.skipped) == (0, 2)


async def test_heartbeat_drops_members_silent_for_an_hour(redis: Redis) -> None:
    now_ms = await redis_now_ms(redis)
    await redis.zadd(
        keys.WORKERS,
        {"gone": now_ms - HEARTBEAT_KEEP_MS - 60_000, "recent": now_ms - HEARTBEAT_KEEP_MS // 2},
    )
    written = await Scripts(redis).heartbeat("w1")
    assert written >= now_ms
    members = dict(await redis.zrange(keys.WORKERS, 0, -1, withscores=True))
    assert set(members) == {"recent", "w1"}
    assert members["w1"] == written


async def _true(value: bool) -> bool:
    return value


async def _score_above(redis: Redis, name: str, score: float) -> bool:
    current = await redis.zscore(keys.WORKERS, name)
    return current is not None and current > score


# -- the memory an accepted request costs ------------------------------------------------------


async def _used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def test_accepted_request_memory_cost_is_covered(
    redis: Redis, pool: aiomysql.Pool, settings: Settings, make_coupon: CouponFactory
) -> None:
    """Measures what ``ACCEPTED_REQUEST_BYTES`` stands for: requests accepted by issue.lua
    and written by a worker (``:users``, the stream, ``:issued``), as ``used_memory`` grows."""
    # Just past a power of two: the sets' hashtables have just doubled, the costliest moment.
    count = 16_385
    coupon = await make_coupon(total=count + 1)
    scripts = Scripts(redis)
    # Warm up: the scripts loaded, the stream, its group and the sets made.
    assert (await scripts.reserve(coupon.id, [1])).reservations[0].result is IssueResult.ACCEPTED
    await drain(redis, pool, settings)
    before = await _used_memory(redis)
    users = random.Random(7).sample(range(10**18, 2**63), count)  # the longest ids
    for first in range(0, count, 500):
        outcome = await scripts.reserve(coupon.id, users[first : first + 500])
        assert {r.result for r in outcome.reservations} == {IssueResult.ACCEPTED}
    await drain(redis, pool, settings)
    per_request = (await _used_memory(redis) - before) / count
    print(f"accepted request: {per_request:.1f} bytes of Redis memory")
    assert 0 < per_request <= ACCEPTED_REQUEST_BYTES
