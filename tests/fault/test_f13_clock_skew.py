"""F13 clock skew: gateway processes whose wall clocks are 30 s fast and 30 s slow (libfaketime
preloaded into the process, monotonic clock untouched), and a worker 30 s fast. The window is
judged on Redis server time alone:

- a window open now by Redis time, [R-10 s, R+25 s), is open on both gateways, although the
  fast one reads R+30 (after its end) and the slow one R-30 (before its start);
- a window that by Redis time starts in 20 s is closed on the fast gateway that reads it open;
- a window that by Redis time ended 20 s ago is closed on the slow gateway that reads it open;
- rows carry the Redis acceptance time, whatever the worker's clock says (I7).

Each gateway's ``Date`` header proves its clock really is off. (faketime is a Debian package;
./scripts/test must install it, see the report.)"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp

from shared.model import from_ms
from tests.fault.checker import check
from tests.fault.load import Kind, LoadClient

SKEW = 30


async def clock_offset(url: str) -> float:
    """The gateway's wall clock minus ours, from its Date header (1 s resolution)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/healthz") as response:
        their = parsedate_to_datetime(response.headers["Date"])
    return (their - datetime.now(UTC)).total_seconds()


async def test_window_is_judged_on_redis_time_whatever_the_gateway_clock(stacks, measure):
    stack = await stacks()
    fast = await stack.start_gateway("gateway-fast", clock_offset_seconds=+SKEW)
    slow = await stack.start_gateway("gateway-slow", clock_offset_seconds=-SKEW)
    await stack.start_worker(0, clock_offset_seconds=+SKEW)
    offsets = {"fast": await clock_offset(fast.url), "slow": await clock_offset(slow.url)}
    assert abs(offsets["fast"] - SKEW) < 3, offsets
    assert abs(offsets["slow"] + SKEW) < 3, offsets

    r = await stack.redis_now_ms()
    open_window = (from_ms(r - 10_000), from_ms(r + 25_000))
    coupon_open = await stack.create_coupon(None, start=open_window[0], end=open_window[1])
    coupon_future = await stack.create_coupon(
        None, start=from_ms(r + 20_000), end=from_ms(r + 60_000)
    )
    coupon_past = await stack.create_coupon(
        None, start=from_ms(r - 60_000), end=from_ms(r - 20_000)
    )

    answers: dict[tuple[str, str], set[tuple[str, int | None, str | None]]] = {}
    async with LoadClient([fast.url, slow.url]) as client:
        for coupon, label in ((coupon_open, "open"), (coupon_future, "future"),
                              (coupon_past, "past")):  # fmt: skip
            for target, gateway in enumerate(("fast", "slow")):
                base = 1 + target * 1_000
                for user in range(base, base + 50):
                    answer = await client.click(coupon.id, user, target=target)
                    answers.setdefault((gateway, label), set()).add(
                        (answer.kind.value, answer.status, answer.code)
                    )
    await stack.wait_drained([coupon_open.id, coupon_future.id, coupon_past.id], within=30)

    verdict = await check(stack, coupon_open, client.history, window=open_window)
    line = measure(
        verdict.line(
            f"F13 clock skew ±{SKEW} s",
            fast_offset=offsets["fast"],
            slow_offset=offsets["slow"],
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    closed = {("fail", 409, "INVALID_COUPON_ISSUE_DATE")}
    assert answers == {
        ("fast", "open"): {("ok", 202, None)},
        ("slow", "open"): {("ok", 202, None)},
        ("fast", "future"): closed,
        ("slow", "future"): closed,
        ("fast", "past"): closed,
        ("slow", "past"): closed,
    }, answers
    assert verdict.rows == 100 == verdict.ok, line
    for closed_coupon in (coupon_future, coupon_past):
        snap = (await check(stack, closed_coupon, client.history)).snapshot
        assert snap.requested == 0, "a closed window accepted something"
        assert not snap.rows
    assert all(a.kind is not Kind.UNKNOWN for a in client.history.answers)
