"""F3 worker SIGKILL under load: while a paced drop runs through a gateway process, the two
worker processes are SIGKILLed in turn and restarted under the same consumer name. I1–I6
hold, and the system drains by itself after the last kill."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.fault.checker import check
from tests.fault.load import LoadClient


async def _drop_with_worker_kills(
    stacks, measure, *, scenario: str, rate: float, kills: int, every: float
) -> None:
    # Small batches: a worker is more often caught holding an uncommitted or unacked batch.
    stack = await stacks(batch_size=50)
    gateway = await stack.start_gateway()
    workers = [await stack.start_worker(slot) for slot in range(2)]
    now = datetime.now(UTC)
    # Unlimited stock: every request becomes work for the workers until the load stops.
    coupon = await stack.create_coupon(
        None, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    # Bounded: at most this many users, or until the load is stopped after the last kill.
    budget = int(rate * (kills * (every + 3) + 30))
    clicks = [(coupon.id, user) for user in range(1, budget + 1)]
    stop = asyncio.Event()
    async with LoadClient(gateway.url, concurrency=64) as client:
        load = client.start(clicks, rate=rate, within=budget / rate, stop=stop)
        await client.wait_for_oks(100, within=30)
        for kill in range(kills):
            worker = workers[kill % 2]
            worker.kill()
            await worker.start()
            # The fault schedule: the next kill comes a fixed time later, whatever happened.
            await asyncio.sleep(every)
        last_fault = time.monotonic()
        stop.set()
        await load
    load_end = time.monotonic()
    drained_at = await stack.wait_drained([coupon.id], within=60)

    verdict = await check(stack, coupon, client.history)
    line = measure(
        verdict.line(
            scenario,
            kills=kills,
            # Batches a restarted worker found in its own pending list, or took from another.
            own_pending_recovered=stack.count_log_events("own_pending_recovered"),
            reclaims=stack.count_log_events("entries_reclaimed"),
            recovery=drained_at - load_end,
        )
    )
    assert not verdict.violations, f"{line}\n{verdict.violations}"
    assert verdict.unknown == 0, f"{line}\n{client.history.statuses()}"
    assert verdict.rows == verdict.ok == verdict.requests, line
    # The load was stopped (after the last kill), not run out: every kill came under load.
    assert client.history.not_sent > 0, line
    assert load_end > last_fault, line


async def test_workers_killed_in_turn_during_a_drop_lose_and_duplicate_nothing(stacks, measure):
    await _drop_with_worker_kills(
        stacks, measure, scenario="F3 worker SIGKILL x4", rate=400, kills=4, every=1.0
    )


@pytest.mark.slow
async def test_workers_killed_forty_times_during_a_long_drop(stacks, measure):
    await _drop_with_worker_kills(
        stacks, measure, scenario="F3 worker SIGKILL x40 (slow)", rate=400, kills=40, every=1.0
    )
