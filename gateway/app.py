"""The gateway application: wiring of resources, routes and middleware."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from prometheus_async.aio.web import server_stats

from gateway import admin, appkeys, changes, compat, console, health, openapi, pages, routes
from gateway.auth import Authenticator
from gateway.backpressure import PipelineHealth, WaitAdmission
from gateway.coalescer import Coalescer
from gateway.feed import Feed
from gateway.issuing import Issuer
from gateway.listener import EagerAcceptSite, listening_socket
from gateway.problems import problem_middleware
from gateway.ratelimit import Limits
from gateway.snapshots import SnapshotCache
from shared import metrics
from shared.mysql.coupon_rows import any_coupon
from shared.mysql.pool import create_pool
from shared.ops.watch import DropWatch
from shared.redis import client as redis_client
from shared.redis import state as redis_state
from shared.redis.replication import ReplicaWait
from shared.redis.scripts import Scripts
from shared.settings import Settings

log = structlog.get_logger(__name__)


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    redis = redis_client.for_settings(settings, socket_timeout=settings.redis_timeout_seconds)
    await redis.ping()
    for warning in await redis_state.check_guarantees(
        redis, min_replicas=settings.redis_min_replicas
    ):
        log.warning("redis_durability_weak", detail=warning)
    app[appkeys.REDIS] = redis
    app[appkeys.SCRIPTS] = Scripts(redis, ReplicaWait.for_settings(redis, settings, path="reserve"))
    yield
    await redis.aclose()


async def _mysql_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = await create_pool(app[appkeys.SETTINGS].mysql, minsize=1, maxsize=5)
    app[appkeys.MYSQL] = pool
    if not await redis_state.state_present(app[appkeys.REDIS], lambda: any_coupon(pool)):
        # Keep serving: every coupon answers 503 until `couponctl rebuild` restores the state.
        log.error("redis_state_lost", action="run couponctl rebuild --all")
    stop = asyncio.Event()
    watcher = asyncio.create_task(health.watch_mysql(pool, stop), name="mysql-watch")
    yield
    stop.set()
    await watcher
    pool.close()
    await pool.wait_closed()


async def _issuing_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    snapshots = SnapshotCache(
        app[appkeys.REDIS],
        ttl=settings.snapshot_ttl_seconds,
        max_entries=settings.snapshot_cache_size,
    )
    coalescer = Coalescer(
        app[appkeys.SCRIPTS],
        max_batch=settings.coalesce_max_batch,
        timeout=settings.redis_timeout_seconds,
    )
    app[appkeys.SNAPSHOTS] = snapshots
    app[appkeys.COALESCER] = coalescer
    health = PipelineHealth(
        app[appkeys.REDIS],
        max_lag=settings.shed_max_lag,
        max_age_seconds=settings.shed_max_age_seconds,
    )
    admission = WaitAdmission(
        coalescer.oldest_wait,
        target_seconds=settings.shed_wait_target_ms / 1000,
        interval_seconds=settings.shed_wait_interval_ms / 1000,
    )
    app[appkeys.ISSUER] = Issuer(snapshots, coalescer, health=health, admission=admission)
    feed = app[appkeys.FEED] = Feed(
        app[appkeys.REDIS],
        snapshots,
        max_subscribers=settings.max_subscribers,
        interval_seconds=settings.feed_interval_ms / 1000,
        heartbeat_seconds=settings.feed_heartbeat_seconds,
        retry_ms=settings.feed_retry_ms,
    )
    app[appkeys.CONSOLE] = console.Console(
        DropWatch(app[appkeys.REDIS], app[appkeys.MYSQL]), health
    )
    stop = asyncio.Event()
    news = [snapshots.news_handler(), feed.news_handler()]
    tasks = [
        asyncio.create_task(changes.listen(app[appkeys.REDIS], news, stop), name="news"),
        asyncio.create_task(feed.run(stop), name="feed"),
        asyncio.create_task(health.run(stop), name="pipeline-health"),
    ]
    yield
    stop.set()
    await coalescer.drain()
    await asyncio.gather(*tasks)


async def _end_feeds(app: web.Application) -> None:
    """Live feed and console streams would hold the shutdown for its whole grace: end them
    first (their clients reconnect, to another process)."""
    app[appkeys.FEED].close()
    await app[appkeys.CONSOLE].close()


async def _all_processes_metrics(request: web.Request) -> web.Response:
    """Prometheus text with every gateway process's totals; the files are read off the loop."""
    body, content_type = await asyncio.to_thread(metrics.exposition)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _admin_listener_ctx(app: web.Application) -> AsyncIterator[None]:
    """With ``COUPON_ADMIN_PORT`` set, serve the admin routes on their own listener, sharing the
    public app's Redis client and MySQL pool (it runs after they are opened, and stops first)."""
    settings = app[appkeys.SETTINGS]
    admin_app = create_admin_app(settings)
    admin_app[appkeys.REDIS] = app[appkeys.REDIS]
    admin_app[appkeys.MYSQL] = app[appkeys.MYSQL]
    admin_app[appkeys.CONSOLE] = app[appkeys.CONSOLE]
    runner = web.AppRunner(
        admin_app,
        access_log=None,
        shutdown_timeout=settings.shutdown_grace_seconds,
        keepalive_timeout=settings.keepalive_timeout_seconds,
        lingering_time=settings.body_read_timeout_seconds,
    )
    await runner.setup()
    try:
        sock = listening_socket(
            settings.admin_host,
            settings.admin_port,
            backlog=settings.listen_backlog,
            reuse_port=settings.gateway_processes > 1,
        )
        await EagerAcceptSite(runner, sock).start()
        log.info("admin_listening", host=settings.admin_host, port=settings.admin_port)
        yield
    finally:
        await runner.cleanup()


def create_admin_app(settings: Settings) -> web.Application:
    """The admin routes alone; :func:`create_app` serves them this way when
    ``COUPON_ADMIN_PORT`` is set (the caller provides ``REDIS`` and ``MYSQL``)."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[problem_middleware(settings.request_log_sample)],
    )
    app[appkeys.SETTINGS] = settings
    _add_admin_routes(app)
    if settings.ops_on_admin_port:
        _add_ops_routes(app)
    return app


def create_app(settings: Settings) -> web.Application:
    """Build the gateway for ``settings``; resources open on start-up, in order."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[problem_middleware(settings.request_log_sample)],
    )
    app[appkeys.SETTINGS] = settings
    app[appkeys.AUTHENTICATOR] = Authenticator(settings)
    app[appkeys.LIMITS] = Limits(settings)
    app.cleanup_ctx.extend([_redis_ctx, _mysql_ctx, _issuing_ctx])
    app.on_shutdown.append(_end_feeds)
    app.add_routes(routes.routes)
    app.add_routes(compat.routes)
    app.add_routes(pages.routes)
    if settings.admin_port:
        # Admin routes only on their own listener: the public one answers 404 for /admin/*.
        app.cleanup_ctx.append(_admin_listener_ctx)
    else:
        _add_admin_routes(app)
    metrics.init_gateway_series()
    if not settings.ops_on_admin_port:
        _add_ops_routes(app)
    return app


def _add_admin_routes(app: web.Application) -> None:
    app.add_routes(admin.routes)
    app.add_routes(console.routes)


def _add_ops_routes(app: web.Application) -> None:
    """``/metrics`` and ``/openapi.json`` (which lists the admin routes): on the public listener
    by default, on the admin listener alone with ``COUPON_OPS_ON_ADMIN_PORT``."""
    # Several processes on one port: any scrape must sum them all (see shared.metrics).
    multi_process = metrics.multiprocess_dir() is not None
    app.router.add_get("/metrics", _all_processes_metrics if multi_process else server_stats)
    app.router.add_get("/openapi.json", openapi.openapi_json)
