"""The gateway application: wiring of resources, routes and middleware."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from prometheus_async.aio.web import server_stats

from gateway import admin, appkeys, compat, routes
from gateway.coalescer import Coalescer
from gateway.issuing import Issuer
from gateway.problems import problem_middleware
from gateway.snapshots import SnapshotCache
from shared import db, redis_client
from shared.scripts import Scripts
from shared.settings import Settings

log = structlog.get_logger(__name__)


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    redis = redis_client.connect(settings.redis_url, socket_timeout=settings.redis_timeout_seconds)
    await redis.ping()
    app[appkeys.REDIS] = redis
    app[appkeys.SCRIPTS] = Scripts(redis)
    yield
    await redis.aclose()


async def _mysql_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = await db.create_pool(app[appkeys.SETTINGS].mysql, minsize=1, maxsize=5)
    app[appkeys.MYSQL] = pool
    yield
    pool.close()
    await pool.wait_closed()


async def _issuing_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    snapshots = SnapshotCache(app[appkeys.REDIS], ttl=settings.snapshot_ttl_seconds)
    coalescer = Coalescer(
        app[appkeys.SCRIPTS],
        max_batch=settings.coalesce_max_batch,
        timeout=settings.redis_timeout_seconds,
    )
    app[appkeys.SNAPSHOTS] = snapshots
    app[appkeys.COALESCER] = coalescer
    app[appkeys.ISSUER] = Issuer(snapshots, coalescer)
    stop = asyncio.Event()
    listener = asyncio.create_task(snapshots.listen(stop), name="snapshot-listener")
    yield
    stop.set()
    await coalescer.drain()
    await listener


def create_app(settings: Settings) -> web.Application:
    """Build the gateway for ``settings``; resources open on start-up, in order."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[problem_middleware],
    )
    app[appkeys.SETTINGS] = settings
    app.cleanup_ctx.extend([_redis_ctx, _mysql_ctx, _issuing_ctx])
    app.add_routes(routes.routes)
    app.add_routes(compat.routes)
    app.add_routes(admin.routes)
    app.router.add_get("/metrics", server_stats)
    return app
