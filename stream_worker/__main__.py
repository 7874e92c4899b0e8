"""``python -m stream_worker`` / ``coupon-worker``: run one worker process.

SIGTERM or SIGINT finishes the batch in hand, then exits 0. Beside the worker loop runs the
stream monitor (per-coupon lag, pending and oldest-pending age gauges), the heartbeat (the
worker's member of ``coupons:workers``, removed at a clean stop) and the retirer (finished
coupons leave Redis), except in burst mode.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog
import uvloop

from shared import metrics
from shared.mysql.pool import create_pool
from shared.redis import client as redis_client
from shared.redis import state as redis_state
from shared.settings import ConfigError, Settings
from shared.startup import exit_on_config_error, settings_or_exit
from stream_worker.health import HealthListener
from stream_worker.heartbeat import Heartbeat
from stream_worker.monitor import StreamMonitor
from stream_worker.retirer import Retirer
from stream_worker.worker import Worker

# How often the stream gauges are refreshed: a little faster than a typical scrape interval.
MONITOR_INTERVAL_SECONDS = 5.0


async def serve(settings: Settings, *, burst: bool = False) -> None:
    log = structlog.get_logger("stream_worker")
    listener = None
    if settings.worker_metrics_port:
        # First, so the port answers (healthz: starting) while the stores are being reached.
        listener = HealthListener(
            settings.http_host,
            settings.worker_metrics_port,
            stuck_after_seconds=settings.worker_stuck_seconds,
        )
        await listener.start()
    try:
        await _serve(settings, burst=burst, listener=listener, log=log)
    finally:
        if listener is not None:
            await listener.stop()


async def _serve(
    settings: Settings,
    *,
    burst: bool,
    listener: HealthListener | None,
    log: structlog.typing.FilteringBoundLogger,
) -> None:
    redis = redis_client.for_settings(
        settings, socket_timeout=settings.redis_socket_timeout_worker, max_connections=8
    )
    await redis.ping()
    for warning in await redis_state.check_guarantees(
        redis, min_replicas=settings.redis_min_replicas
    ):
        log.warning("redis_durability_weak", detail=warning)
    pool = await create_pool(settings.mysql, minsize=1, maxsize=2)
    worker = Worker(redis, pool, settings)
    if listener is not None:
        listener.attach(worker.seconds_since_turn, redis, pool)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    stop_monitor = asyncio.Event()
    background: list[asyncio.Task[None]] = []
    if not burst:
        background.append(
            asyncio.create_task(
                StreamMonitor(redis, interval=MONITOR_INTERVAL_SECONDS).run(stop_monitor),
                name="stream-monitor",
            )
        )
        background.append(
            asyncio.create_task(
                Heartbeat(
                    redis,
                    worker.name,
                    worker.seconds_since_turn,
                    stuck_after_seconds=settings.worker_stuck_seconds,
                ).run(stop_monitor),
                name="worker-heartbeat",
            )
        )
        retirer = Retirer(
            redis,
            pool,
            after_seconds=settings.retire_after_seconds,
            worker_name=worker.name,
        )
        background.append(asyncio.create_task(retirer.run(stop_monitor), name="retirer"))
    try:
        await worker.run(burst=burst)
    finally:
        stop_monitor.set()
        # The heartbeat removes this worker's member before the client closes.
        await asyncio.gather(*background)
        pool.close()
        await pool.wait_closed()
        await redis.aclose()
        log.info("worker_exited", consumer=worker.name)


def main() -> None:
    settings = settings_or_exit("coupon-worker")
    metrics.init_worker_series()
    try:
        uvloop.run(serve(settings, burst="--burst" in sys.argv[1:]))
    except ConfigError as exc:  # found at start-up, e.g. a Redis that may evict keys
        exit_on_config_error("coupon-worker", exc)


if __name__ == "__main__":
    main()
