"""F6 duplicate delivery: two worker processes hold the same entries at once (one read them,
the other claimed them after the idle time), both frozen just before COMMIT, then released
together so both transactions race on the same rows. One row per user, every row inserted
exactly once, issued_quantity right, nothing pending, nothing dead-lettered."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from tests.fault.checker import check
from tests.fault.harness import ServiceProcess, wait_until
from tests.fault.load import History, reserve_directly

USERS = 400


async def frozen(worker: ServiceProcess) -> None:
    async def stopped() -> bool:
        return worker.is_stopped()

    await wait_until(stopped, within=30, what=f"{worker.name} frozen")
    worker.paused = True


async def test_same_entries_committed_by_two_workers_at_once_give_one_row_each(stacks, measure):
    stack = await stacks(batch_size=1000, reclaim_idle_ms=1000, max_deliveries=3)
    now = datetime.now(UTC)
    coupon = await stack.create_coupon(
        USERS, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    history = History()
    await reserve_directly(stack.redis, coupon.id, list(range(1, USERS + 1)), history)

    first = await stack.start_worker(0, crash_at="pause_before_commit")
    await frozen(first)
    assert await stack.pending_of([coupon.id], "fault-worker-0") == USERS
    # The second one reads nothing new; it takes the first one's entries once they are idle.
    second = await stack.start_worker(1, crash_at="pause_before_commit")
    await frozen(second)
    assert await stack.pending_of([coupon.id], "fault-worker-1") == USERS

    first.resume()
    second.resume()
    codes = await asyncio.gather(first.wait_exit(within=30), second.wait_exit(within=30))
    assert codes == [0, 0], f"{first.log_tail()}\n{second.log_tail()}"

    verdict = await check(stack, coupon, history)
    committed = [e for w in (first, second) for e in w.events("batch_committed")]
    inserted = sum(int(e["inserted"]) for e in committed)
    already = sum(int(e["already_issued"]) for e in committed)
    line = measure(
        verdict.line("F6 double claim", inserted=inserted, already_issued_on_redelivery=already)
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert verdict.rows == USERS, line
    assert verdict.dead == 0, line
    # One transaction inserted every row; the other found every user already issued.
    assert inserted == USERS, line
    assert already == USERS, line
