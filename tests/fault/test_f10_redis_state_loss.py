"""F10 Redis state loss: mid-drop, Redis is replaced by an empty one (killed, its data
directory wiped, restarted). The gateway must tell "state lost" from "no such coupon": it
answers 503, never 404 and never a 202 (selling again from an empty dedup set and stock would
oversell and double-issue). ``couponctl rebuild <id>`` restores the dedup set and the issued
marks from MySQL and reopens the coupon; the drop continues. Never I1 or I2.

Accepted requests that were still waiting in the lost stream are gone with it (that is what
losing Redis's disk means; F9 shows AOF keeps them across a crash); their number is reported,
and only users accepted before the loss may be among them."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import orjson

from tests.fault.checker import check
from tests.fault.harness import wait_until
from tests.fault.load import Kind, LoadClient
from tests.helpers import couponctl

USERS, TOTAL = 2_400, 1_500
LOST_FOR = 1.5


async def test_redis_restarted_empty_refuses_until_rebuilt_and_never_resells(stacks, measure):
    stack = await stacks()
    gateway = await stack.start_gateway()
    for slot in range(2):
        await stack.start_worker(slot)
    now = datetime.now(UTC)
    coupon = await stack.create_coupon(
        TOTAL, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    clicks = [(coupon.id, user) for user in range(1, USERS + 1)]
    async with LoadClient(gateway.url) as client:
        load = client.start(clicks, rate=400, within=60)
        await client.wait_for_oks(500, within=30)
        client.phase = "lost"
        await stack.redis_server.restart(empty=True)
        lost_at = time.monotonic()
        # The fault's duration: the drop goes on against a Redis without state.
        await asyncio.sleep(LOST_FOR)
        client.phase = "rebuilding"

        async def lost_phase_answered() -> bool:
            return client.history.answered("lost") == client.sent["lost"]

        await wait_until(lost_phase_answered, within=10, what="answers of the lost phase")
        code, out, err = await couponctl(stack.settings, "--json", "rebuild", str(coupon.id))
        assert code == 0, err
        rebuilt_at = time.monotonic()
        client.phase = "after"
        await load
    load_end = time.monotonic()
    drained_at = await stack.wait_drained([coupon.id], within=60)

    verdict = await check(
        stack, coupon, client.history, tolerate_lost=True, stream_accounting=False
    )
    during = client.history.statuses(phase="lost")
    accepted_before = {a.user_id for a in client.history.answers
                       if a.kind is Kind.OK and a.phase == "load"}  # fmt: skip
    line = measure(
        verdict.line(
            "F10 Redis state loss + rebuild",
            answers_while_lost=dict(during),
            rebuild=orjson.loads(out) if out.strip().startswith(("{", "[")) else out.strip(),
            time_to_rebuild=rebuilt_at - lost_at,
            recovery=drained_at - rebuilt_at,
            after_load=drained_at - load_end,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    # While the state was lost: refused, and refused as "unavailable", not "no such coupon".
    assert sum(during.values()) > 0, line
    assert set(during) == {"503 FAIL_COUPON_ISSUE_REQUEST"}, line
    # The drop continued after the rebuild, without selling past the total.
    assert client.history.counts(phase="after")["ok"] > 0, line
    assert verdict.rows <= TOTAL, line
    # Only promises made before the loss, still queued in the lost stream, can be missing.
    assert set(verdict.lost) <= accepted_before, line
