"""F12 end of window: requests accepted just before ``date_issue_end`` are consumed only after
it (no worker runs until the window has closed, by Redis time). They are all issued, stamped
with their acceptance time; requests after the end are refused definitely (409) and leave
nothing behind. Load runs across the boundary, so the last accepted ones are milliseconds
before it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.model import from_ms
from tests.fault.checker import check
from tests.fault.harness import wait_until
from tests.fault.load import Kind, LoadClient

WINDOW_LEFT_MS = 2_000


async def test_requests_accepted_before_the_end_are_issued_after_it(stacks, measure):
    stack = await stacks()
    gateway = await stack.start_gateway()
    redis_now = await stack.redis_now_ms()
    start = datetime.now(UTC) - timedelta(minutes=1)
    end = from_ms(redis_now + WINDOW_LEFT_MS)
    coupon = await stack.create_coupon(10_000, start=start, end=end)

    async def window_closed() -> bool:
        return await stack.redis_now_ms() >= redis_now + WINDOW_LEFT_MS

    async with LoadClient(gateway.url) as client:
        # Paced across the end: about 2 s of load inside the window, 1 s after it.
        clicks = [(coupon.id, user) for user in range(1, 1_201)]
        load = client.start(clicks, rate=400, within=30)
        await wait_until(window_closed, within=10, what="window closed (Redis time)")
        await load
        client.phase = "after end"
        late = [await client.click(coupon.id, user) for user in range(2_001, 2_021)]

    # Only now, after the end, does any worker see the requests.
    assert await stack.redis_now_ms() >= redis_now + WINDOW_LEFT_MS
    await stack.start_worker(0)
    await stack.wait_drained([coupon.id], within=30)
    consumed_after_end_ms = await stack.redis_now_ms() - (redis_now + WINDOW_LEFT_MS)

    verdict = await check(stack, coupon, client.history, window=(start, end))
    last_ok_ms = max(
        int(a.request_id.partition("-")[0])
        for a in client.history.answers
        if a.kind is Kind.OK and a.request_id
    )
    line = measure(
        verdict.line(
            "F12 end of window",
            last_accept_before_end_ms=redis_now + WINDOW_LEFT_MS - last_ok_ms,
            drained_after_end_ms=consumed_after_end_ms,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert verdict.ok > 0, line
    assert verdict.rows == verdict.ok, line
    assert verdict.unknown == 0, line
    refused = {(a.status, a.code) for a in client.history.answers if a.kind is Kind.FAIL}
    assert refused == {(409, "INVALID_COUPON_ISSUE_DATE")}, refused
    assert all(a.kind is Kind.FAIL for a in late), late
