"""F14 overload: one coupon driven past what its reservations can carry. Each process makes
one reservation call per coupon at a time; with batches capped at 4 requests, 512 requests
kept in flight by the clients queue behind each other, and the oldest of them waits past the
20 ms target for longer than the 100 ms interval: a standing queue. The gateway sheds with 503
"requests wait too long" before reserving: a shed request leaves no slot, no stream entry and no
row. No other 5xx, no client timeout; accepted latency is reported (p50/p99), not asserted (no
wall-clock thresholds in tests)."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta

from shared import keys
from tests.fault.checker import check
from tests.fault.load import Kind, LoadClient, percentile

MAX_BATCH, CLIENT_CONCURRENCY = 4, 512
USERS = 6_000
SHED_TITLE = "Requests wait too long for a reservation"


async def test_overload_is_shed_before_anything_is_reserved(stacks, measure):
    stack = await stacks(
        coalesce_max_batch=MAX_BATCH, shed_wait_target_ms=20, shed_wait_interval_ms=100
    )
    gateway = await stack.start_gateway()
    for slot in range(2):
        await stack.start_worker(slot)
    now = datetime.now(UTC)
    # Enough stock for everyone: every refusal seen here is shedding, never "sold out".
    coupon = await stack.create_coupon(
        USERS, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    started = time.monotonic()
    async with LoadClient(gateway.url, concurrency=CLIENT_CONCURRENCY) as client:
        await client.paced(
            [(coupon.id, user) for user in range(1, USERS + 1)], rate=math.inf, within=60
        )
    load_end = time.monotonic()
    drained_at = await stack.wait_drained([coupon.id], within=60)

    answers = client.history.answers
    shed = {a.user_id for a in answers if a.status == 503 and a.title == SHED_TITLE}
    accepted_latency = [a.latency for a in answers if a.kind is Kind.OK]
    verdict = await check(stack, coupon, client.history)
    line = measure(
        verdict.line(
            f"F14 overload: {CLIENT_CONCURRENCY} in flight, batches of {MAX_BATCH}",
            shed=len(shed),
            rate_per_s=round(len(answers) / (load_end - started)),
            p50_accepted=percentile(accepted_latency, 0.5),
            p99_accepted=percentile(accepted_latency, 0.99),
            recovery=drained_at - load_end,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert shed, f"nothing was shed at {CLIENT_CONCURRENCY} in flight: {line}"
    others = {
        status: n
        for status, n in client.history.statuses().items()
        if status not in {"202", "503 FAIL_COUPON_ISSUE_REQUEST"}
    }
    assert not others, f"{others}\n{line}"
    titles = {a.title for a in answers if a.status == 503}
    assert titles == {SHED_TITLE}, f"503s other than shedding: {titles}"

    # Shed means nothing was reserved: no slot, no stream entry, no row.
    k = keys.CouponKeys(coupon.id)
    slots = {int(u) for u in await stack.redis.smembers(k.users)}
    entries = {int(f["u"]) for _, f in await stack.redis.xrange(k.requests)}
    assert not shed & slots, sorted(shed & slots)[:10]
    assert not shed & entries, sorted(shed & entries)[:10]
    assert not shed & set(verdict.snapshot.rows)
    assert verdict.rows == verdict.ok == USERS - len(shed), line
