"""``python -m stream_worker`` / ``coupon-worker``: run one worker process.

SIGTERM or SIGINT finishes the batch in hand, then exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog
import uvloop
from prometheus_client import start_http_server

from shared import db, redis_client
from shared import logging as shared_logging
from shared.settings import ConfigError, Settings
from stream_worker.worker import Worker


async def serve(settings: Settings, *, burst: bool = False) -> None:
    log = structlog.get_logger("stream_worker")
    redis = redis_client.connect(
        settings.redis_url, socket_timeout=settings.redis_socket_timeout_worker, max_connections=8
    )
    await redis.ping()
    pool = await db.create_pool(settings.mysql, minsize=1, maxsize=2)
    worker = Worker(redis, pool, settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    try:
        await worker.run(burst=burst)
    finally:
        pool.close()
        await pool.wait_closed()
        await redis.aclose()
        log.info("worker_exited", consumer=worker.name)


def main() -> None:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"coupon-worker: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    shared_logging.configure(settings.log_format, settings.log_level)
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr=settings.http_host)
    uvloop.run(serve(settings, burst="--burst" in sys.argv[1:]))


if __name__ == "__main__":
    main()
