"""The gateway with coalescing taken out: one ``issue.lua`` EVALSHA per request.

Everything else is the real gateway (snapshot cache, validation, problem rendering, logging);
only the reservation differs, so the ratio against the real gateway is what coalescing buys.
(``COUPON_COALESCE_MAX_BATCH=1`` is not this: it serialises the calls of one coupon, one in
flight at a time, which is slower than the naive design.) ``python -m tests.bench.naive_app``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import uvloop
from aiohttp import web

from gateway import appkeys
from gateway.app import create_app
from gateway.coalescer import Coalescer, StateMissing
from gateway.issuing import Issuer
from shared import logging as shared_logging
from shared import metrics
from shared.redis import client as redis_client
from shared.redis.scripts import Reservation, Scripts
from shared.settings import Settings


class PerRequestReserver(Coalescer):
    """Sends every request's reservation on its own, concurrently, as a naive gateway would."""

    async def reserve(self, coupon_id: int, user_id: int) -> Reservation:
        started = time.perf_counter()
        outcome = await asyncio.wait_for(self._scripts.reserve(coupon_id, [user_id]), self._timeout)
        metrics.RESERVE_SECONDS.observe(time.perf_counter() - started)
        metrics.RESERVE_BATCH_SIZE.observe(1)
        self.redis_clock_offset_ms = outcome.redis_time_ms - int(time.time() * 1000)
        for callback in self.on_outcome:
            callback(coupon_id, outcome)
        if outcome.state_missing:
            raise StateMissing(coupon_id)
        return outcome.reservations[0]


async def _per_request_reserver_ctx(app: web.Application) -> AsyncIterator[None]:
    # Runs after the gateway's own start-up, so the snapshot cache exists. One call per request
    # needs one connection per request in flight: the gateway's pool (64) would run dry under
    # 64 connections plus its own background tasks, so the naive variant gets a pool of 512.
    settings = app[appkeys.SETTINGS]
    redis = redis_client.connect(
        settings.redis_url, socket_timeout=settings.redis_timeout_seconds, max_connections=512
    )
    reserver = PerRequestReserver(
        Scripts(redis), max_batch=1, timeout=settings.redis_timeout_seconds
    )
    app[appkeys.COALESCER] = reserver
    app[appkeys.ISSUER] = Issuer(app[appkeys.SNAPSHOTS], reserver)
    yield
    await redis.aclose()


def main() -> None:
    settings = Settings.from_env()
    shared_logging.configure(settings.log_format, settings.log_level)
    app = create_app(settings)
    app.cleanup_ctx.append(_per_request_reserver_ctx)
    web.run_app(
        app,
        host=settings.http_host,
        port=settings.http_port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
