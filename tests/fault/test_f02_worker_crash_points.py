"""F2 worker crash points: a worker process dies (``os._exit``) before its COMMIT, after its
COMMIT but before any XACK, or halfway through acknowledging, on a batch spanning two coupons.
Then either the same consumer restarts (and re-reads its own pending entries) or another worker
reclaims them. 0 lost, 0 duplicate rows, the dead worker's pending list empty, no dead letter."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.fault.checker import check
from tests.fault.crashing_worker import CRASH_EXIT_CODE
from tests.fault.load import History, reserve_directly

TOTAL_A, TOTAL_B = 150, 150
USERS_A, USERS_B = 200, 100


@pytest.mark.parametrize("recovery", ["same_consumer_restarts", "another_worker_reclaims"])
@pytest.mark.parametrize("crash_at", ["before_commit", "after_commit", "mid_ack"])
async def test_worker_crash_at_any_point_loses_and_duplicates_nothing(
    stacks, measure, crash_at, recovery
):
    # One read takes every entry of both streams, so the crash hits a two-coupon batch.
    stack = await stacks(batch_size=1000)
    now = datetime.now(UTC)
    window = {"start": now - timedelta(minutes=1), "end": now + timedelta(hours=1)}
    coupon_a = await stack.create_coupon(TOTAL_A, **window)
    coupon_b = await stack.create_coupon(TOTAL_B, **window)
    ids = [coupon_a.id, coupon_b.id]
    history = History()
    await reserve_directly(stack.redis, coupon_a.id, list(range(1, USERS_A + 1)), history)
    await reserve_directly(stack.redis, coupon_b.id, list(range(1, USERS_B + 1)), history)
    accepted = min(USERS_A, TOTAL_A) + min(USERS_B, TOTAL_B)

    crashing = await stack.start_worker(0, crash_at=crash_at)
    code = await crashing.wait_exit(within=30)
    crashed_at = time.monotonic()
    assert code == CRASH_EXIT_CODE, f"the driver died otherwise:\n{crashing.log_tail()}"

    rows = (await stack.sql("SELECT COUNT(*) FROM coupon_issues"))[0][0]
    left_pending = await stack.pending_of(ids, "fault-worker-0")
    expected_rows = 0 if crash_at == "before_commit" else accepted
    expected_pending = accepted - (accepted // 2 if crash_at == "mid_ack" else 0)
    assert (rows, left_pending) == (expected_rows, expected_pending), "crash point not as designed"

    await stack.start_worker(0 if recovery == "same_consumer_restarts" else 1)
    drained_at = await stack.wait_drained(ids, within=30)

    for coupon in (coupon_a, coupon_b):
        verdict = await check(stack, coupon, history)
        line = measure(
            verdict.line(
                f"F2 crash {crash_at}, {recovery}, coupon {'AB'[ids.index(coupon.id)]}",
                pending_at_crash=left_pending,
                rows_at_crash=rows,
                recovery=drained_at - crashed_at,
            )
        )
        assert not verdict.violations, f"{line}\n{verdict.violations}"
        assert verdict.rows == min(verdict.requests, coupon.total_quantity or 0), line
        assert verdict.dead == 0, line
    assert await stack.pending_of(ids, "fault-worker-0") == 0
