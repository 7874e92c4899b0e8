"""The worker's HTTP listener on ``COUPON_WORKER_METRICS_PORT``: ``/metrics``, and the probes.

- ``/healthz`` (liveness) answers 200 while the worker's loop turns: it notes each turn (a read,
  a commit attempt, a retry), and a worker whose last turn is older than
  ``COUPON_WORKER_STUCK_SECONDS`` is stuck (a call that never returns, a frozen MySQL) and
  answers 503, so Kubernetes restarts it; its entries stay pending and are re-read or reclaimed.
  A worker retrying a MySQL that is down is turning, not stuck: a restart would not help it.
- ``/readyz`` answers 200 once the loop has turned and Redis answers; MySQL's state is reported
  in the body. A worker takes no traffic, so readiness only paces a rollout.

It runs on the worker's own event loop: a loop that is blocked cannot answer either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiomysql
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.mysql.pool import answers

log = structlog.get_logger(__name__)

CHECK_TIMEOUT_SECONDS = 1.0


class HealthListener:
    """Serves the metrics and the probes; :meth:`attach` the worker once it is built."""

    def __init__(self, host: str, port: int, *, stuck_after_seconds: float) -> None:
        self._host = host
        self._port = port
        self._stuck_after = stuck_after_seconds
        self._since_turn: Callable[[], float | None] | None = None
        self._redis: Redis | None = None
        self._pool: aiomysql.Pool | None = None
        self._runner: web.AppRunner | None = None

    def attach(
        self, since_turn: Callable[[], float | None], redis: Redis, pool: aiomysql.Pool
    ) -> None:
        """``since_turn()``: seconds since the loop last turned, None before its first turn."""
        self._since_turn, self._redis, self._pool = since_turn, redis, pool

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", _metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _turn_age(self) -> float | None:
        return None if self._since_turn is None else self._since_turn()

    async def _healthz(self, request: web.Request) -> web.Response:
        age = self._turn_age()
        if age is not None and age > self._stuck_after:
            log.error("worker_stuck", seconds_since_turn=round(age, 1))
            return web.json_response(
                {"status": "stuck", "seconds_since_turn": round(age, 1)}, status=503
            )
        status = "starting" if age is None else "ok"
        return web.json_response(
            {"status": status, "seconds_since_turn": None if age is None else round(age, 1)}
        )

    async def _readyz(self, request: web.Request) -> web.Response:
        age = self._turn_age()
        checks = {
            "loop": "starting" if age is None else "stuck" if age > self._stuck_after else "ok",
            "redis": await self._redis_state(),
            "mysql": await self._mysql_state(),
        }
        ready = checks["loop"] == "ok" and checks["redis"] == "ok"
        return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)

    async def _redis_state(self) -> str:
        if self._redis is None:
            return "starting"
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                await self._redis.ping()
        except (RedisError, OSError, TimeoutError):
            return "unreachable"
        return "ok"

    async def _mysql_state(self) -> str:
        if self._pool is None:
            return "starting"
        return "ok" if await answers(self._pool) else "unreachable"


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
