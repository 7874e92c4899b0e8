"""F1 contention, at process level: 5,000 users clicking 1–3 times each, all at once, on a
coupon of 100, through a real gateway process (native and seed routes mixed) and two worker
processes. Exactly 100 rows; I1–I6; no answer other than 202/200 or a definite refusal."""

from __future__ import annotations

import math
import random
import time
from datetime import UTC, datetime, timedelta

from tests.fault.checker import check
from tests.fault.load import SEED_ASYNC, LoadClient

USERS, TOTAL = 5_000, 100


async def test_5000_users_clicking_at_once_get_exactly_100_coupons(stacks, measure):
    stack = await stacks()
    gateway = await stack.start_gateway()
    for slot in range(2):
        await stack.start_worker(slot)
    now = datetime.now(UTC)
    coupon = await stack.create_coupon(
        TOTAL, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    rng = random.Random(20_261_127)
    clicks = [(coupon.id, user) for user in range(1, USERS + 1) for _ in range(rng.randint(1, 3))]
    rng.shuffle(clicks)

    started = time.monotonic()
    async with LoadClient(gateway.url, concurrency=200) as client:
        half = len(clicks) // 2
        # The seed's async route and the native route share the dedup set and the stock.
        await client.paced(clicks[:half], rate=math.inf, within=60)
        await client.paced(clicks[half:], rate=math.inf, within=60, route=SEED_ASYNC)
    load_end = time.monotonic()
    drained_at = await stack.wait_drained([coupon.id], within=30)

    verdict = await check(stack, coupon, client.history)
    line = measure(
        verdict.line(
            "F1 contention",
            load=load_end - started,
            recovery=drained_at - load_end,
            clicks=len(clicks),
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert verdict.rows == TOTAL, line
    assert verdict.ok == TOTAL, line
    refusals = {"409 DUPLICATED_COUPON_ISSUE", "409 INVALID_COUPON_ISSUE_QUANTITY"}
    seed_refusals = {"200 이미 발급된 쿠폰입니다.", "200 쿠폰 발급 수량이 유효하지 않습니다."}
    unexpected = {
        status: n
        for status, n in client.history.statuses().items()
        if status not in {"202", "200"} | refusals | seed_refusals
    }
    assert not unexpected, f"{line}\nunexpected answers: {unexpected}"
