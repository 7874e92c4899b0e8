"""Probes that fit Kubernetes, under the faults they must tell apart.

- MariaDB stopped: the gateway stays ready (acceptance never waits for MySQL) and says MySQL is
  unreachable in the body and in ``coupon_gateway_mysql_up``; the worker stays alive (it is
  retrying, its loop turns) and ready.
- MariaDB frozen (SIGSTOP) while a batch commits: the worker's commit never returns, its loop
  stops turning, and its ``/healthz`` answers 503 after ``COUPON_WORKER_STUCK_SECONDS``; once
  MariaDB runs again it is healthy again. The gateway stays ready throughout.

The drop runs all the while; every 202 becomes a row (I1–I7 checked at the end).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from tests.fault.checker import check
from tests.fault.load import LoadClient
from tests.helpers import wait_for

STUCK_SECONDS = 3.0


async def _probe(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
        return response.status, await response.json()


async def _gauge(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in {url}/metrics")


async def test_probes_tell_mysql_down_from_a_stuck_worker(stacks, measure):
    stack = await stacks(private_mysql=True)
    mysql = stack.mysql_server
    assert mysql is not None
    gateway = await stack.start_gateway()
    worker = await stack.start_worker(0, worker_stuck_seconds=STUCK_SECONDS)
    now = datetime.now(UTC)
    users = 2_000
    coupon = await stack.create_coupon(
        users, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    clicks = [(coupon.id, user) for user in range(1, users + 1)]
    ready, alive = f"{gateway.url}/readyz", f"{worker.url}/healthz"
    async with aiohttp.ClientSession() as session, LoadClient(gateway.url) as client:
        load = client.start(clicks, rate=50, within=users / 50 + 60)
        await client.wait_for_oks(50, within=30)
        assert await _probe(session, ready) == (200, {"ready": True, "redis": "ok", "mysql": "ok"})
        assert (await _probe(session, alive))[0] == 200
        assert (await _probe(session, f"{worker.url}/readyz"))[0] == 200

        client.phase = "mysql_down"
        await mysql.terminate()

        async def gateway_reports_mysql_down() -> bool:
            status, body = await _probe(session, ready)
            assert status == 200, body  # never out of service for MySQL
            return body["mysql"] == "unreachable"

        await wait_for(gateway_reports_mysql_down, within=15, interval=0.2)
        assert await _gauge(session, gateway.url, "coupon_gateway_mysql_up") == 0
        # Healthy throughout a stretch longer than "stuck": retrying MySQL is turning.
        until = time.monotonic() + STUCK_SECONDS + 1
        while time.monotonic() < until:
            status, body = await _probe(session, alive)
            assert (status, body["status"]) == (200, "ok"), body
            await asyncio.sleep(0.2)
        status, body = await _probe(session, f"{worker.url}/readyz")
        assert (status, body["mysql"]) == (200, "unreachable"), body

        client.phase = "mysql_back"
        await mysql.start()

        async def gateway_reports_mysql_up() -> bool:
            return (await _probe(session, ready))[1]["mysql"] == "ok"

        await wait_for(gateway_reports_mysql_up, within=15, interval=0.2)

        client.phase = "mysql_frozen"
        mysql.pause()
        try:

            async def worker_stuck() -> bool:
                status, body = await _probe(session, alive)
                return status == 503 and body["status"] == "stuck"

            await wait_for(worker_stuck, within=STUCK_SECONDS + 20, interval=0.2)
            assert (await _probe(session, ready))[0] == 200
        finally:
            mysql.resume()
        client.phase = "after"

        async def worker_healthy() -> bool:
            return (await _probe(session, alive))[0] == 200

        await wait_for(worker_healthy, within=30, interval=0.2)
        await load
    await stack.wait_drained([coupon.id], within=120)
    verdict = await check(stack, coupon, client.history)
    line = measure(verdict.line("probes: MySQL down, then frozen"))
    assert not verdict.violations, f"{line}\n{verdict.violations}"
