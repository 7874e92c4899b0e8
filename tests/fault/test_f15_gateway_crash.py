"""F15 gateway crash: the gateway process is SIGKILLed under load and restarted on the same
port. Clients whose requests were in flight see resets or refused connections (unknown),
never a lost 202: every 202 given before the crash still becomes a row. Retrying the unknown
ones after the restart sells the rest of the stock and never a second coupon to anyone."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.fault.checker import check
from tests.fault.load import LoadClient

USERS, TOTAL = 3_000, 2_600


async def _drop_with_gateway_kills(stacks, measure, *, kills: int, users: int, total: int) -> None:
    stack = await stacks()
    gateway = await stack.start_gateway()
    for slot in range(2):
        await stack.start_worker(slot)
    now = datetime.now(UTC)
    coupon = await stack.create_coupon(
        total, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    clicks = [(coupon.id, user) for user in range(1, users + 1)]
    downtime = 0.0
    async with LoadClient(gateway.url) as client:
        load = client.start(clicks, rate=500, within=users / 500 + 60)
        for kill in range(kills):
            await client.wait_for_oks(total // (kills + 2) * (kill + 1), within=30)
            client.phase = f"kill{kill}"
            killed = time.monotonic()
            gateway.kill()
            await gateway.start()
            restarted = time.monotonic()
            downtime += restarted - killed
            client.phase = "load"
        await load
        # A client retries what it does not know; an accepted request answers "duplicate".
        _, unknown_users, _ = client.history.partition(coupon.id)
        client.phase = "retry"
        await client.paced([(coupon.id, u) for u in sorted(unknown_users)], rate=500, within=60)
    load_end = time.monotonic()
    drained_at = await stack.wait_drained([coupon.id], within=60)

    verdict = await check(stack, coupon, client.history)
    errors = {
        status: n
        for status, n in client.history.statuses().items()
        if not status.startswith(("202", "409"))
    }
    retried = client.history.statuses(phase="retry")
    line = measure(
        verdict.line(
            f"F15 gateway SIGKILL x{kills}",
            downtime=downtime,
            client_errors=sum(errors.values()),
            retried_duplicate=retried["409 DUPLICATED_COUPON_ISSUE"],
            recovery=drained_at - restarted,
            after_load=drained_at - load_end,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert verdict.unknown > 0, f"no request was caught by the crash: {line}"
    assert verdict.rows == total, line
    # What a crash may show a client: a reset, a refused connection; never a wrong answer.
    assert all(not s[0].isdigit() or s.startswith("503") for s in errors), errors


async def test_gateway_killed_under_load_never_loses_a_202(stacks, measure):
    await _drop_with_gateway_kills(stacks, measure, kills=2, users=USERS, total=TOTAL)


@pytest.mark.slow
async def test_gateway_killed_ten_times_under_load(stacks, measure):
    await _drop_with_gateway_kills(stacks, measure, kills=10, users=15_000, total=12_000)
