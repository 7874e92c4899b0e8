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
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from tests.fault.checker import check
from tests.fault.load import LoadClient

STUCK_SECONDS = 3.0


async def _probe(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
        return response.status, await response.json()


async def _until(condition: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.2)


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

        await _until(gateway_reports_mysql_down, within=15, what="gateway says mysql unreachable")
        assert await _gauge(session, gateway.url, "coupon_gateway_mysql_up") == 0
        await asyncio.sleep(STUCK_SECONDS + 1)  # longer than "stuck": retrying is turning
        status, body = await _probe(session, alive)
        assert (status, body["status"]) == (200, "ok"), body
        status, body = await _probe(session, f"{worker.url}/readyz")
        assert (status, body["mysql"]) == (200, "unreachable"), body

        client.phase = "mysql_back"
        await mysql.start()

        async def gateway_reports_mysql_up() -> bool:
            return (await _probe(session, ready))[1]["mysql"] == "ok"

        await _until(gateway_reports_mysql_up, within=15, what="gateway says mysql ok")

        client.phase = "mysql_frozen"
        mysql.pause()
        try:

            async def worker_stuck() -> bool:
                status, body = await _probe(session, alive)
                return status == 503 and body["status"] == "stuck"

            await _until(worker_stuck, within=STUCK_SECONDS + 20, what="worker /healthz 503")
            assert (await _probe(session, ready))[0] == 200
        finally:
            mysql.resume()
        client.phase = "after"

        async def worker_healthy() -> bool:
            return (await _probe(session, alive))[0] == 200

        await _until(worker_healthy, within=30, what="worker /healthz 200 again")
        await load
    await stack.wait_drained([coupon.id], within=120)
    verdict = await check(stack, coupon, client.history)
    line = measure(verdict.line("probes: MySQL down, then frozen"))
    assert not verdict.violations, f"{line}\n{verdict.violations}"
