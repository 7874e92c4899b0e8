"""The gateway process as a drop meets it: its listen queue is as long as configured (the kernel
caps it at ``net.core.somaxconn``, and the gateway says so at start), and the hot routes log a
sample of their requests while every other route logs each one."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson

from tests.helpers import REPO, child_env, drain, free_port, wait_for

SOMAXCONN = int(Path("/proc/sys/net/core/somaxconn").read_text())


def _records(log: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in log.read_bytes().splitlines() if line.startswith(b"{")]


def _listen_queue(port: int) -> int:
    """The accept queue size of the socket listening on ``port`` (``ss``: Send-Q)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    sizes = {int(line.split()[2]) for line in out.splitlines() if line.strip()}
    assert len(sizes) == 1, out
    return sizes.pop()


async def test_listen_backlog_is_applied_and_hot_routes_log_a_sample(
    settings, redis, pool, make_coupon, check_invariants, tmp_path
):
    coupon = await make_coupon(total=3)
    port = free_port()
    # One more than the kernel allows: the queue is capped, and the gateway warns about it.
    asked = SOMAXCONN + 1
    env = child_env(
        settings.replace(
            http_port=port,
            log_format="json",
            log_level="info",
            listen_backlog=asked,
            request_log_sample=0.0,
        )
    )
    log = tmp_path / "gateway.log"
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        gateway = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", cwd=REPO, env=env, stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    accepted: set[int] = set()
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                try:
                    async with session.get(f"{base}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, within=30, interval=0.05)
            assert _listen_queue(port) == min(asked, SOMAXCONN)
            issues = f"{base}/v1/coupons/{coupon.id}/issues"
            statuses = []
            for user in range(1, 6):  # three accepted, two sold out
                async with session.post(issues, json={"user_id": user}) as response:
                    statuses.append(response.status)
                    assert response.headers["X-Request-ID"]
                    if response.status == 202:
                        accepted.add(user)
            assert statuses == [202, 202, 202, 409, 409]
            async with session.get(f"{base}/healthz", headers={"X-Request-ID": "h-1"}):
                pass
            # A stray byte in the caller's id: a fresh id, and the request still succeeds.
            async with session.get(f"{base}/healthz", headers={"X-Request-ID": "\xff"}) as r:
                assert r.status == 200
                assert r.headers["X-Request-ID"] != "\xff"
    finally:
        gateway.terminate()
        await asyncio.wait_for(gateway.wait(), 30)
    records = _records(log)
    capped = [r for r in records if r.get("event") == "listen_backlog_capped"]
    assert capped, records[:5]
    assert capped[0]["somaxconn"] == SOMAXCONN
    lines = [r for r in records if r.get("event") == "http_request"]
    routes = [str(r["route"]) for r in lines]
    # At a sample of 0 the issue route logs nothing (no 5xx happened); health checks log each.
    assert "/v1/coupons/{coupon_id}/issues" not in routes, routes
    assert routes.count("/healthz") == 2
    assert {r["request_id"] for r in lines if r["route"] == "/healthz"} >= {"h-1"}
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted=accepted, rejected={4, 5})
