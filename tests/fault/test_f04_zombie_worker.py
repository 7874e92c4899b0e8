"""F4 zombie worker: a worker frozen (SIGSTOP) longer than ``COUPON_RECLAIM_IDLE_MS`` while
it holds a batch; another worker takes the batch over and settles it; then the zombie wakes
(SIGCONT) and finishes its stale batch. No duplicate row, no dead letter, and its late COMMIT
and XACK change nothing.

Frozen at a chosen point (the crash driver stops itself: before COMMIT, after COMMIT, or inside
its transaction while it holds the coupon row lock), and frozen from outside under load."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.fault.checker import check
from tests.fault.harness import Stack, WorkerProcess, wait_until
from tests.fault.load import History, LoadClient, reserve_directly

USERS = 300


@pytest.mark.parametrize("frozen_at", ["pause_before_commit", "pause_after_commit"])
async def test_zombie_worker_waking_after_takeover_changes_nothing(stacks, measure, frozen_at):
    stack = await stacks(batch_size=1000)
    now = datetime.now(UTC)
    coupon = await stack.create_coupon(
        USERS, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    history = History()
    await reserve_directly(stack.redis, coupon.id, list(range(1, USERS + 1)), history)

    # The driver stops itself (SIGSTOP) at the chosen point of its first batch.
    zombie = await stack.start_worker(0, crash_at=frozen_at)

    async def frozen() -> bool:
        return zombie.is_stopped()

    await wait_until(frozen, within=30, what="zombie frozen")
    zombie.paused = True
    assert await stack.pending_of([coupon.id], "fault-worker-0") == USERS
    frozen = time.monotonic()

    await stack.start_worker(1)
    taken_over = await stack.wait_drained([coupon.id], within=30)
    rows_before_wake = (await stack.sql("SELECT COUNT(*) FROM coupon_issues"))[0][0]

    zombie.resume()
    assert await zombie.wait_exit(within=30) == 0, zombie.log_tail()

    verdict = await check(stack, coupon, history)
    line = measure(
        verdict.line(
            f"F4 zombie frozen {frozen_at.removeprefix('pause_')}",
            takeover=taken_over - frozen,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert rows_before_wake == USERS == verdict.rows, line
    assert verdict.dead == 0, line
    # The zombie's own log shows it did finish the stale batch after waking.
    assert "batch_committed" in zombie.log_tail(200), zombie.log_tail()


async def test_worker_frozen_inside_its_transaction_does_not_stall_the_coupon(stacks, measure):
    """A worker frozen while its transaction holds the coupon row lock (``FOR UPDATE``): the
    other worker must still take its entries over and keep issuing, not queue behind a lock
    that nobody will release while the zombie sleeps."""
    stack = await stacks(batch_size=1000)
    now = datetime.now(UTC)
    coupon = await stack.create_coupon(
        None, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    history = History()
    await reserve_directly(stack.redis, coupon.id, list(range(1, USERS + 1)), history)
    zombie = await stack.start_worker(0, crash_at="pause_in_transaction")

    async def frozen() -> bool:
        return zombie.is_stopped()

    await wait_until(frozen, within=30, what="zombie frozen")
    zombie.paused = True
    frozen_at = time.monotonic()
    await stack.start_worker(1)
    # The drop goes on while the zombie sleeps.
    await reserve_directly(stack.redis, coupon.id, list(range(USERS + 1, 2 * USERS + 1)), history)

    async def all_issued() -> bool:
        rows = await stack.sql("SELECT COUNT(*) FROM coupon_issues WHERE coupon_id = %s",
                               (coupon.id,))  # fmt: skip
        return int(rows[0][0]) == 2 * USERS

    try:
        issued_at = await wait_until(all_issued, within=20, what="issued beside a frozen worker")
    finally:
        rows_while_frozen = (await stack.sql("SELECT COUNT(*) FROM coupon_issues"))[0][0]
        measure(
            f"F4 zombie frozen inside its transaction: rows_while_frozen={rows_while_frozen}"
            f" of {2 * USERS}, waited={time.monotonic() - frozen_at:.2f}s"
        )
    zombie.resume()
    assert await zombie.wait_exit(within=60) == 0, zombie.log_tail()
    await stack.wait_drained([coupon.id], within=30)
    verdict = await check(stack, coupon, history)
    line = measure(verdict.line("F4 zombie frozen in transaction", takeover=issued_at - frozen_at))
    assert not verdict.violations, f"{line}\n{verdict.violations}"


async def freeze_while_holding(stack: Stack, worker: WorkerProcess, coupon_id: int) -> int:
    """SIGSTOP the worker at a moment it holds entries (a batch in hand, or what Redis hands
    its blocked XREADGROUP); frozen between two reads it would hold nothing, so thaw it and
    try again. Returns how many entries it holds, frozen."""
    consumer = worker.consumer

    async def holds_some() -> bool:
        return await stack.pending_of([coupon_id], consumer) > 0

    for _ in range(20):
        worker.pause()
        try:
            await wait_until(holds_some, within=0.5, what="frozen worker holds entries")
        except AssertionError:
            worker.resume()
            # Let it run a moment before the next try (fault scheduling, not a wait).
            await asyncio.sleep(0.03)
            continue
        return await stack.pending_of([coupon_id], consumer)
    raise AssertionError(f"{worker.name} never held entries when frozen")


async def test_worker_stopped_past_reclaim_time_under_load_duplicates_nothing(stacks, measure):
    stack = await stacks(batch_size=50)
    gateway = await stack.start_gateway()
    workers = [await stack.start_worker(slot) for slot in range(2)]
    now = datetime.now(UTC)
    coupon = await stack.create_coupon(
        None, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    clicks = [(coupon.id, user) for user in range(1, 20_001)]
    stop = asyncio.Event()
    async with LoadClient(gateway.url) as client:
        load = client.start(clicks, rate=400, within=50, stop=stop)
        await client.wait_for_oks(200, within=30)
        held = await freeze_while_holding(stack, workers[0], coupon.id)
        # The fault's duration: well past the reclaim idle time (1 s).
        await asyncio.sleep(2.5)
        workers[0].resume()
        woke = time.monotonic()
        # More load with the zombie awake again, then stop.
        await client.wait_for_oks(client.history.ok_count() + 200, within=30)
        stop.set()
        await load
    load_end = time.monotonic()
    drained_at = await stack.wait_drained([coupon.id], within=60)

    verdict = await check(stack, coupon, client.history)
    line = measure(
        verdict.line(
            "F4 zombie SIGSTOP 2.5 s under load",
            held_when_frozen=held,
            reclaims=stack.count_log_events("entries_reclaimed"),
            recovery=drained_at - load_end,
            since_wake=drained_at - woke,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert verdict.unknown == 0, line
    assert verdict.dead == 0, line
    assert verdict.rows == verdict.ok == verdict.requests, line
    assert workers[0].running, f"the zombie died after waking:\n{workers[0].log_tail()}"
