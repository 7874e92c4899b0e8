"""Invariant I5 as a standing check: ``coupon_requests_unaccounted`` = accepted - issued -
pending - dead-lettered - correction, per coupon, measured by the workers' stream monitor from
Redis alone, and the alert on it.

Real Redis and MariaDB; the monitor measures exactly what a worker's monitor would, and each
test checks the gauge it publishes as well as the value it returns.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiomysql
import orjson
import yaml
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from shared import keys
from shared.model import Coupon
from shared.mysql import issue_store
from shared.mysql.issue_store import Entry
from shared.redis.scripts import IssueResult, Scripts
from shared.settings import Settings
from stream_worker.monitor import OTHER, StreamMonitor, StreamState
from stream_worker.worker import Worker
from tests.conftest import CouponFactory
from tests.helpers import REPO, couponctl, drain, issue, row_count, wait_for
from tests.invariants import Checker

# The Redis Cluster of tests/test_cluster.py (started for this module too): the balance is one
# script call per coupon, routed to the coupon's shard, in one pipeline over every shard.
from tests.test_cluster import (  # noqa: F401 - fixtures
    cluster_ports,
    cluster_redis,
    cluster_settings,
    make_coupon_on,
)

GAUGE = "coupon_requests_unaccounted"


def _gauge(label: str) -> float | None:
    return REGISTRY.get_sample_value(GAUGE, {"coupon": label})


async def _measure(monitor: StreamMonitor, coupon_id: int) -> StreamState | None:
    """The monitor's measurement of one coupon (None: not a live coupon), after checking that
    the gauge it published says the same."""
    found = [s for s in await monitor.collect() if s.coupon_id == coupon_id]
    state = found[0] if found else None
    value = None if state is None else state.unaccounted
    assert _gauge(str(coupon_id)) == (None if value is None else float(value))
    return state


async def _unaccounted(monitor: StreamMonitor, coupon_id: int) -> int | None:
    state = await _measure(monitor, coupon_id)
    return None if state is None else state.unaccounted


async def _accept(client: TestClient[Any, Any], coupon: Coupon, users: range) -> set[int]:
    answers = await asyncio.gather(*(issue(client, coupon.id, user) for user in users))
    return {user for user, (status, _) in zip(users, answers, strict=True) if status == 202}


async def _lose_an_acknowledgement(redis: Redis, coupon: Coupon, user: int) -> str:
    """A request whose entry was acknowledged without a row or a dead letter (as a worker bug or
    a hand-made XACK would leave it): the user holds a slot and the entry is settled."""
    k = keys.CouponKeys(coupon.id)
    lost: str = await redis.xadd(k.requests, {"c": coupon.id, "u": user, "t": 1})
    await redis.xreadgroup(keys.GROUP, "ghost", {k.requests: ">"})
    await redis.xack(k.requests, keys.GROUP, lost)
    await redis.sadd(k.users, user)
    return lost


async def _reconcile(settings: Settings, coupon: Coupon, *repair: str) -> tuple[int, Any]:
    code, out, err = await couponctl(settings, "--json", "reconcile", str(coupon.id), *repair)
    assert code in (0, 3), err
    (report,) = orjson.loads(out)
    return code, report


# -- a drop ----------------------------------------------------------------------------------


async def test_zero_through_a_drop_while_pending_committed_and_issued(
    client: TestClient[Any, Any],
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=5)
    monitor = StreamMonitor(redis, interval=1.0)
    assert await _unaccounted(monitor, coupon.id) == 0  # nothing accepted yet

    accepted = await _accept(client, coupon, range(1, 9))
    assert len(accepted) == 5
    state = await _measure(monitor, coupon.id)
    assert state is not None
    assert (state.lag, state.pending, state.unaccounted) == (5, 0, 0)

    # A worker read two entries and committed their rows, and has not acknowledged them yet:
    # they are pending (no issued mark before the acknowledgement), never counted twice.
    k = keys.CouponKeys(coupon.id)
    read: Any = await redis.xreadgroup(keys.GROUP, settings.worker_name, {k.requests: ">"}, count=2)
    entries = [Entry.parse(coupon.id, entry_id, fields) for entry_id, fields in read[0][1]]
    result = await issue_store.write_batch(pool, entries)
    assert len(result.inserted) == 2
    state = await _measure(monitor, coupon.id)
    assert state is not None
    assert (state.lag, state.pending, state.unaccounted) == (3, 2, 0)

    # Redis lost its script cache (a restart, SCRIPT FLUSH): the monitor loads it again.
    await redis.script_flush()
    assert await _unaccounted(monitor, coupon.id) == 0

    await drain(redis, pool, settings)  # the same consumer settles its own two, then the rest
    state = await _measure(monitor, coupon.id)
    assert state is not None
    assert (state.backlog, state.unaccounted) == (0, 0)
    await check_invariants(coupon, accepted=accepted, rejected=set(range(1, 9)) - accepted)


async def test_every_measurement_is_exact_while_a_worker_drains_a_live_drop(
    client: TestClient[Any, Any],
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    """Reservations, commits, acknowledgements (small batches: many of them) and measurements
    interleave on the server; the balance is read in one script call, so no measurement falls
    between an entry's acknowledgement and its issued mark."""
    coupon = await make_coupon(total=150)
    monitor = StreamMonitor(redis, interval=1.0)
    accepted = await _accept(client, coupon, range(1, 51))
    worker = Worker(redis, pool, settings.replace(batch_size=7, worker_name="live-worker"))
    running = asyncio.create_task(worker.run())
    more = asyncio.create_task(_accept(client, coupon, range(51, 201)))
    measured: list[tuple[int, int | None]] = []

    async def settled() -> bool:
        accepting_done = more.done()  # before the measurement: nothing is added after it
        state = await _measure(monitor, coupon.id)
        assert state is not None
        measured.append((state.backlog, state.unaccounted))
        return accepting_done and state.backlog == 0

    try:
        await wait_for(settled, within=60, interval=0)
    finally:
        worker.stop()
        await running
    accepted |= await more
    assert {value for _, value in measured} == {0}, measured
    assert any(backlog > 0 for backlog, _ in measured)  # measured while requests were in flight
    await check_invariants(coupon, accepted=accepted, rejected=set(range(1, 201)) - accepted)


async def test_the_synchronous_route_shows_issued_at_once_and_counts_once(
    client: TestClient[Any, Any],
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=3)
    monitor = StreamMonitor(redis, interval=1.0)
    for user in (1, 2):
        response = await client.post("/v1/issue", json={"userId": user, "couponId": coupon.id})
        assert await response.json() == {"isSuccess": True}
    # Both rows are committed and shown issued, while their entries wait for a worker: the
    # balance counts each once, as pending, until the worker acknowledges it.
    assert await row_count(pool, coupon.id) == 2
    status = await client.get(f"/v1/coupons/{coupon.id}/issues/1")
    assert (await status.json())["status"] == "issued"
    state = await _measure(monitor, coupon.id)
    assert state is not None
    assert (state.backlog, state.unaccounted) == (2, 0)

    await drain(redis, pool, settings)  # the worker finds the rows and acknowledges
    state = await _measure(monitor, coupon.id)
    assert state is not None
    assert (state.backlog, state.unaccounted) == (0, 0)
    assert await redis.smembers(keys.CouponKeys(coupon.id).issued) == {"1", "2"}
    status = await client.get(f"/v1/coupons/{coupon.id}/issues/2")
    assert (await status.json())["status"] == "issued"
    await check_invariants(coupon, accepted={1, 2})


# -- drift and its repair --------------------------------------------------------------------


async def test_a_lost_acknowledgement_shows_until_reconcile_repairs_it(
    client: TestClient[Any, Any],
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=10)
    monitor = StreamMonitor(redis, interval=1.0)
    accepted = await _accept(client, coupon, range(1, 4))
    await drain(redis, pool, settings)
    assert await _unaccounted(monitor, coupon.id) == 0

    lost = await _lose_an_acknowledgement(redis, coupon, 50)
    assert await _unaccounted(monitor, coupon.id) == 1
    code, report = await _reconcile(settings, coupon)
    assert (code, report["details"]["accepted_missing"]) == (3, [lost])
    assert await _unaccounted(monitor, coupon.id) == 1  # reporting changes nothing

    code, report = await _reconcile(settings, coupon, "--repair")
    assert (code, report["repaired"]) == (0, True)
    # Re-queued as a new entry, its original counted in the correction, in one MULTI.
    k = keys.CouponKeys(coupon.id)
    assert await redis.get(k.correction) == "1"
    state = await _measure(monitor, coupon.id)
    assert state is not None
    assert (state.backlog, state.unaccounted) == (1, 0)

    await drain(redis, pool, settings)
    assert await _unaccounted(monitor, coupon.id) == 0
    code, report = await _reconcile(settings, coupon)
    assert code == 0
    assert all(report[name] == 0 for name in report["details"])
    await check_invariants(coupon, accepted=accepted | {50})


async def test_dead_letter_and_replay_keep_the_balance_closed(
    client: TestClient[Any, Any],
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=3)
    monitor = StreamMonitor(redis, interval=1.0)
    status, body = await issue(client, coupon.id, 7)
    assert status == 202
    k = keys.CouponKeys(coupon.id)
    await redis.xreadgroup(keys.GROUP, "ghost", {k.requests: ">"})  # a consumer gone for good
    code, out, err = await couponctl(
        settings, "--json", "dead", "release", str(coupon.id), body["request_id"]
    )
    assert (code, orjson.loads(out)["result"]) == (0, "dead_lettered"), err
    state = await _measure(monitor, coupon.id)
    assert state is not None
    assert (state.backlog, state.unaccounted) == (0, 0)  # accepted 1 = dead 1

    # The dead letter stays (dead 1); the replay is a new entry (accepted 2, pending 1).
    code, out, err = await couponctl(settings, "--json", "dead", "replay", str(coupon.id))
    assert (code, orjson.loads(out)[0]["result"]) == (0, "queued"), err
    state = await _measure(monitor, coupon.id)
    assert state is not None
    assert (state.backlog, state.unaccounted) == (1, 0)

    await drain(redis, pool, settings)  # accepted 2 = issued 1 + dead 1
    assert await _unaccounted(monitor, coupon.id) == 0
    assert await redis.get(k.correction) is None  # a replay needs no correction
    await check_invariants(coupon, accepted={7})


async def test_rebuild_after_redis_lost_everything_keeps_the_balance_closed(
    client: TestClient[Any, Any],
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=40)
    monitor = StreamMonitor(redis, interval=1.0)
    first = await _accept(client, coupon, range(1, 31))
    await drain(redis, pool, settings)
    assert await _unaccounted(monitor, coupon.id) == 0

    await redis.flushall()  # no live coupon left: nothing is measured, no series is left over
    assert await _measure(monitor, coupon.id) is None
    code, _, err = await couponctl(settings, "--json", "rebuild", str(coupon.id))
    assert code == 0, err
    # An empty stream (entries-added 0) against 30 marks from MySQL: the rebuild took the 30
    # rows without a request in the stream off the correction.
    k = keys.CouponKeys(coupon.id)
    assert await redis.get(k.correction) == "-30"
    assert await _unaccounted(monitor, coupon.id) == 0

    fresh = await _accept(client, coupon, range(100, 120))
    assert len(fresh) == 10
    state = await _measure(monitor, coupon.id)
    assert state is not None
    assert (state.backlog, state.unaccounted) == (10, 0)
    await drain(redis, pool, settings)
    assert await _unaccounted(monitor, coupon.id) == 0
    # A second rebuild, of a Redis that lost nothing, changes nothing.
    code, _, err = await couponctl(settings, "--json", "rebuild", str(coupon.id))
    assert code == 0, err
    assert await _unaccounted(monitor, coupon.id) == 0
    # With the correction, I5 closes across the loss too (no stream_history_lost needed).
    await check_invariants(coupon, accepted=first | fresh, rejected=set(range(100, 120)) - fresh)


async def test_rebuild_of_a_surviving_stream_keeps_its_drift_visible(
    client: TestClient[Any, Any],
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=10)
    monitor = StreamMonitor(redis, interval=1.0)
    accepted = await _accept(client, coupon, range(1, 4))
    await drain(redis, pool, settings)
    await _lose_an_acknowledgement(redis, coupon, 50)
    k = keys.CouponKeys(coupon.id)
    await redis.delete(k.meta, k.users, k.issued)  # the sets lost, the stream kept
    assert await _measure(monitor, coupon.id) is not None
    code, _, err = await couponctl(settings, "--json", "rebuild", str(coupon.id))
    assert code == 0, err
    # The restored marks belong to requests in the stream: no correction, and the lost
    # request is not papered over.
    assert await redis.get(k.correction) is None
    assert await _unaccounted(monitor, coupon.id) == 1
    code, _ = await _reconcile(settings, coupon, "--repair")
    assert code == 0
    await drain(redis, pool, settings)
    assert await _unaccounted(monitor, coupon.id) == 0
    await check_invariants(coupon, accepted=accepted | {50})


# -- what is reported ------------------------------------------------------------------------


async def test_other_sums_only_the_positive_values_and_unknown_is_not_reported(
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    losing, doubled, quiet = [await make_coupon(total=5) for _ in range(3)]
    scripts = Scripts(redis)
    for coupon in (losing, doubled, quiet):
        outcome = await scripts.reserve(coupon.id, [1, 2])
        assert all(r.result is IssueResult.ACCEPTED for r in outcome.reservations)
    await drain(redis, pool, settings)
    await redis.srem(keys.CouponKeys(losing.id).issued, 1)  # a mark lost by hand: +1
    await redis.sadd(keys.CouponKeys(doubled.id).issued, 61)  # a mark added by hand: -1

    monitor = StreamMonitor(redis, interval=1.0, max_series=1)
    states = {s.coupon_id: s for s in await monitor.collect()}
    assert {c.id: states[c.id].unaccounted for c in (losing, doubled, quiet)} == {
        losing.id: 1, doubled.id: -1, quiet.id: 0,
    }  # fmt: skip
    # The highest id wins the one label (equal backlogs); the other two are summed, and the
    # double count does not cancel the loss.
    assert _gauge(str(quiet.id)) == 0
    assert _gauge(str(losing.id)) is None
    assert _gauge(OTHER) == 1

    await redis.sadd(keys.CouponKeys(losing.id).issued, 1)
    await redis.srem(keys.CouponKeys(doubled.id).issued, 61)
    states = {s.coupon_id: s for s in await monitor.collect()}
    assert {states[c.id].unaccounted for c in (losing, doubled, quiet)} == {0}
    assert _gauge(OTHER) == 0
    for coupon in (losing, doubled, quiet):
        await check_invariants(coupon, accepted={1, 2})

    # A stream Redis cannot count (a hole among the undelivered entries leaves the group
    # without a lag) is left out rather than reported as some number. Written by hand only:
    # nothing was accepted through the service, so there are no invariants to check.
    uncountable = await make_coupon(total=5)
    k = keys.CouponKeys(uncountable.id)
    ids = [await redis.xadd(k.requests, {"c": uncountable.id, "u": u}) for u in (9, 10, 11)]
    await redis.xdel(k.requests, ids[1])  # a hole among the undelivered: Redis has no lag
    state = await _measure(StreamMonitor(redis, interval=1.0), uncountable.id)
    assert state is not None
    assert (state.lag, state.unaccounted) == (2, None)  # the backlog counts them by reading


async def test_the_balance_on_a_redis_cluster(
    cluster_redis: Redis,  # noqa: F811 - the fixture
    cluster_settings: Settings,  # noqa: F811 - the fixture
    pool: aiomysql.Pool,
    make_coupon_on: Any,  # noqa: F811 - the fixture
) -> None:
    made = [await make_coupon_on(cluster_redis, total=total) for total in (3, 4, 5, None)]
    scripts = Scripts(cluster_redis)
    for coupon in made:
        await scripts.reserve(coupon.id, list(range(1, 7)))
    monitor = StreamMonitor(cluster_redis, interval=1.0)
    states = {s.coupon_id: s for s in await monitor.collect()}  # EVAL, shard by shard
    assert {c.id: (states[c.id].backlog, states[c.id].unaccounted) for c in made} == {
        c.id: (min(c.total_quantity or 6, 6), 0) for c in made
    }
    await drain(cluster_redis, pool, cluster_settings)
    states = {s.coupon_id: s for s in await monitor.collect()}
    assert {c.id: states[c.id].unaccounted for c in made} == {c.id: 0 for c in made}
    checker = Checker(pool, cluster_redis)
    for coupon in made:
        await checker(coupon, accepted=range(1, min(coupon.total_quantity or 6, 6) + 1))


# -- the alert and its documents -------------------------------------------------------------


def test_the_alert_fires_on_a_lasting_positive_value_and_links_its_runbook() -> None:
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text("utf-8"))
    (rule,) = [
        rule
        for group in alerts["groups"]
        for rule in group["rules"]
        if rule["alert"] == "CouponRequestsUnaccounted"
    ]
    assert rule["expr"] == f"max by (coupon) ({GAUGE}) > 0"
    assert rule["for"] == "5m"
    assert rule["annotations"]["runbook_url"] == "docs/RUNBOOK.md#couponrequestsunaccounted"
    runbook = (REPO / "docs" / "RUNBOOK.md").read_text("utf-8")
    section = runbook.split("## CouponRequestsUnaccounted\n", 1)[1].split("\n## ", 1)[0]
    assert "couponctl reconcile ID" in section
    assert "couponctl reconcile ID --repair" in section
    assert "below 0" in section
    readme = (REPO / "README.md").read_text("utf-8")
    assert f"| `{GAUGE}` | gauge | `coupon` |" in readme
