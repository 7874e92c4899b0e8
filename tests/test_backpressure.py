"""Load shedding: the gateway answers 503 with Retry-After *before* reserving when the workers
are too far behind on a coupon or the process's reservation queue stands (its oldest request
has waited past a target for a whole interval), and takes requests again once it has caught
up."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from gateway.app import create_app
from shared import keys
from tests.helpers import drain, issue, wait_for


@pytest.fixture
def make_client(aiohttp_client, redis, pool):
    async def make(settings) -> TestClient[Any, Any]:
        return await aiohttp_client(create_app(settings))

    return make


async def assert_holds_nothing(redis, coupon_id: int, users: set[int]) -> None:
    k = keys.CouponKeys(coupon_id)
    holders = {int(u) for u in await redis.smembers(k.users)}
    queued = {int(f["u"]) for _, f in await redis.xrange(k.requests)}
    assert not users & holders, "a shed request took a slot"
    assert not users & queued, "a shed request was queued"


def _outcomes(outcome: str) -> float:
    return REGISTRY.get_sample_value("coupon_issue_requests_total", {"outcome": outcome}) or 0.0


class Prober:
    """Sends one request at a time, each for a new user, and sorts the users by answer."""

    def __init__(self, client: TestClient[Any, Any], coupon_id: int) -> None:
        self._client = client
        self._coupon_id = coupon_id
        self._users = iter(range(100, 100_000))
        self.accepted: set[int] = set()
        self.shed: set[int] = set()
        self.last_detail = ""

    async def until(self, wanted: int) -> None:
        """Probe (with a deadline) until a request is answered with ``wanted``."""

        async def answered() -> bool:
            user = next(self._users)
            response = await self._client.post(
                f"/v1/coupons/{self._coupon_id}/issues", json={"user_id": user}
            )
            body = await response.json(content_type=None)
            if response.status == 503:
                assert response.headers["Retry-After"] == "2"
                self.shed.add(user)
                self.last_detail = body["detail"]
            else:
                assert response.status == 202, body
                self.accepted.add(user)
            return response.status == wanted

        await wait_for(answered, within=10.0, interval=0.1)


async def test_sheds_while_too_many_requests_wait_for_a_worker(
    make_client, settings, redis, pool, make_coupon, check_invariants
):
    client = await make_client(settings.replace(shed_max_lag=5, shed_max_age_seconds=0))
    coupon = await make_coupon(total=100)
    for user in range(1, 7):  # no worker runs: six requests wait
        assert (await issue(client, coupon.id, user))[0] == 202
    before = {outcome: _outcomes(outcome) for outcome in ("shed", "unavailable")}
    probe = Prober(client, coupon.id)
    await probe.until(503)
    assert "wait for a worker" in probe.last_detail
    await assert_holds_nothing(redis, coupon.id, probe.shed)
    # Shedding is its own outcome, not an outage (the alerts tell the two apart).
    assert _outcomes("shed") - before["shed"] == len(probe.shed)
    assert _outcomes("unavailable") == before["unavailable"]
    await drain(redis, pool, settings)
    await probe.until(202)  # caught up: requests are taken again
    await drain(redis, pool, settings)
    accepted = set(range(1, 7)) | probe.accepted
    await check_invariants(coupon, accepted=accepted, rejected=probe.shed)


async def test_sheds_while_the_oldest_request_waits_too_long(
    make_client, settings, redis, pool, make_coupon, check_invariants
):
    client = await make_client(settings.replace(shed_max_lag=0, shed_max_age_seconds=0.3))
    coupon = await make_coupon(total=100)
    assert (await issue(client, coupon.id, 1))[0] == 202
    # A consumer took it and never finishes (as when MySQL is down and batches are retried).
    k = keys.CouponKeys(coupon.id)
    await redis.xreadgroup(keys.GROUP, "stuck", {k.requests: ">"})
    probe = Prober(client, coupon.id)
    await probe.until(503)
    assert "old" in probe.last_detail
    await assert_holds_nothing(redis, coupon.id, probe.shed)
    await drain(redis, pool, settings)  # another worker reclaims and settles it
    await probe.until(202)
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted={1} | probe.accepted, rejected=probe.shed)


async def test_a_standing_reservation_queue_is_shed_and_a_drained_one_is_not(
    make_client, settings, redis, pool, make_coupon, check_invariants
):
    client = await make_client(
        settings.replace(
            shed_wait_target_ms=50, shed_wait_interval_ms=100, redis_timeout_seconds=5.0
        )
    )
    coupon = await make_coupon(total=1000)
    assert (await issue(client, coupon.id, 1))[0] == 202
    # Redis holds every write for a while: the reservation in flight, and everything queued
    # behind it, waits. Past the target for a whole interval, new requests are shed.
    await redis.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
    waiting = [asyncio.create_task(issue(client, coupon.id, user)) for user in (2, 3)]
    shed: set[int] = set()
    users = iter(range(100, 10_000))

    async def shedding() -> bool:
        user = next(users)
        status, body = await asyncio.wait_for(issue(client, coupon.id, user), 0.05)
        assert status == 503, body
        assert body["title"] == "Requests wait too long for a reservation", body
        shed.add(user)
        return True

    async def answered_at_once() -> bool:
        try:
            return await shedding()
        except TimeoutError:  # admitted: queued behind the paused call (answered later)
            return False

    try:
        await wait_for(answered_at_once, within=2.5, interval=0.02)
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
    assert [status for status, _ in await asyncio.gather(*waiting)] == [202, 202]
    await assert_holds_nothing(redis, coupon.id, shed)
    # The queue drained: a burst of requests at once is served, none shed.
    burst = range(20_000, 20_200)
    statuses = await asyncio.gather(*(issue(client, coupon.id, user) for user in burst))
    assert {status for status, _ in statuses} == {202}
    await drain(redis, pool, settings)
    accepted = {1, 2, 3, *burst}
    await check_invariants(coupon, accepted=accepted, rejected=shed)
