"""Retiring a finished coupon: refused while it is live or unsettled; then its Redis state goes
(but for the snapshot, kept as the marker), it leaves ``coupons:active``, its history stays in
MySQL, and every route still answers its users correctly. Automatic after
``COUPON_RETIRE_AFTER_SECONDS`` in the worker; at once with ``couponctl coupon retire`` or
``POST /admin/coupons/{id}/retire``. 100 retired drops give back their Redis memory.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomysql
import orjson
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from shared import keys
from shared.model import Coupon
from shared.mysql import coupon_rows
from shared.ops import audit, coupons, dead_letters
from shared.ops.retire import retire_coupon
from shared.redis.scripts import Scripts
from shared.redis.streams import redis_now_ms
from shared.settings import Settings
from stream_worker.reader import StreamReader
from stream_worker.retirer import Retirer
from tests.conftest import CouponFactory
from tests.helpers import ADMIN, TEST_ACTOR, assert_problem, couponctl, drain, issue, wait_for
from tests.invariants import Checker
from tests.test_openapi import check_against_document
from tests.test_unaccounted import _lose_an_acknowledgement

WINDOW_SECONDS = 1.5


async def _ending_soon(make_coupon: CouponFactory, total: int | None, seconds: float) -> Coupon:
    now = datetime.now(UTC)
    return await make_coupon(
        total, start=now - timedelta(minutes=1), end=now + timedelta(seconds=seconds)
    )


async def _wait_until_ended(redis: Redis, coupon: Coupon, after_ms: int = 0) -> None:
    async def ended() -> bool:
        return await redis_now_ms(redis) >= coupon.end_ms + after_ms

    await wait_for(ended, within=WINDOW_SECONDS + after_ms / 1000 + 10)


async def _dead_letter(redis: Redis, pool: aiomysql.Pool, coupon_id: int, entry_id: str) -> None:
    """Dead-letter an accepted request the way an operator does for a stuck one."""
    k = keys.CouponKeys(coupon_id)
    await redis.xreadgroup(keys.GROUP, "stuck-consumer", {k.requests: ">"}, count=100)
    result = await dead_letters.release_pending(pool, redis, coupon_id, entry_id, actor=TEST_ACTOR)
    assert result == "dead_lettered"


async def _state_keys(redis: Redis, coupon_id: int) -> dict[str, int]:
    k = keys.CouponKeys(coupon_id)
    return {key: int(await redis.exists(key)) for key in k.all()}


async def test_a_finished_coupon_retires_and_its_users_still_get_true_answers(
    client: TestClient[Any, Any], make_coupon: CouponFactory, redis: Redis, pool: aiomysql.Pool,
    settings: Settings, check_invariants: Checker,
) -> None:
    coupon = await _ending_soon(make_coupon, 3, WINDOW_SECONDS)
    request_ids = {}
    for user in (1, 2, 3):
        status, body = await issue(client, coupon.id, user)
        assert status == 202, body
        request_ids[user] = body["request_id"]
    status, _ = await issue(client, coupon.id, 4)
    assert status == 409  # sold out: a definite rejection

    # Live: refused, with the reason, by couponctl (exit 1) and by the admin API (409).
    code, _, err = await couponctl(settings, "coupon", "retire", str(coupon.id))
    assert code == 1
    assert "is live" in err
    response = await client.post(f"/admin/coupons/{coupon.id}/retire", headers=ADMIN)
    problem = await assert_problem(response, 409, "CONFLICT")
    assert "window ends" in problem["detail"]

    await _dead_letter(redis, pool, coupon.id, request_ids[3])
    await _wait_until_ended(redis, coupon)
    # Ended, but users 1 and 2 wait for a worker: unsettled.
    code, _, err = await couponctl(settings, "coupon", "retire", str(coupon.id))
    assert code == 1
    assert "not settled" in err
    k = keys.CouponKeys(coupon.id)
    assert await redis.exists(k.users, k.requests, k.dead) == 3  # nothing was removed
    assert not await redis.hexists(k.meta, "retired_reserved")  # nor sealed

    await drain(redis, pool, settings)
    before = await check_invariants(coupon, accepted={1, 2, 3}, rejected={4})
    shown_before = await coupons.show_coupon(pool, redis, coupon.id)

    response = await client.post(f"/admin/coupons/{coupon.id}/retire", headers=ADMIN)
    body = await response.read()
    assert response.status == 200, body
    retired = check_against_document(
        "POST", f"/admin/coupons/{coupon.id}/retire", 200, response.content_type,
        response.headers, body,
    )  # fmt: skip
    assert retired == {
        "coupon_id": coupon.id, "requested": 3, "reserved": 2, "dead_lettered": 1,
        "already": False,
    }  # fmt: skip

    # Only the snapshot stays; the coupon is off the scanned set.
    assert await _state_keys(redis, coupon.id) == {key: int(key == k.meta) for key in k.all()}
    assert await redis.hget(k.meta, "retired_reserved") == "2"
    assert not await redis.sismember(keys.ACTIVE_COUPONS, str(coupon.id))

    # The status route answers from MySQL: issued, failed, never requested.
    for user, expected in ((1, "issued"), (2, "issued"), (3, "failed")):
        response = await client.get(f"/v1/coupons/{coupon.id}/issues/{user}")
        assert response.status == 200
        assert (await response.json())["status"] == expected
    for user in (4, 99):
        response = await client.get(f"/v1/coupons/{coupon.id}/issues/{user}")
        await assert_problem(response, 404, "ISSUE_NOT_FOUND")
    # Issuing answers "outside the window" and writes nothing.
    response = await client.post(f"/v1/coupons/{coupon.id}/issues", json={"user_id": 50})
    await assert_problem(response, 409, "INVALID_COUPON_ISSUE_DATE")
    assert not await redis.exists(k.requests)
    # The public view keeps the final stock; the admin view keeps the counters.
    response = await client.get(f"/v1/coupons/{coupon.id}")
    public = await response.json()
    assert (public["remaining"], public["sold_out"], public["retired"]) == (1, False, True)
    shown = await coupons.show_coupon(pool, redis, coupon.id)
    assert {**shown_before, "retired": True} == shown

    # A retired coupon is not changed, replayed, or reported as drift.
    response = await client.patch(f"/admin/coupons/{coupon.id}", json={"paused": True},
                                  headers=ADMIN)  # fmt: skip
    problem = await assert_problem(response, 409, "CONFLICT")
    assert "retired" in problem["detail"]
    assert await dead_letters.replay(pool, redis, coupon.id, actor=TEST_ACTOR) == []
    code, out, err = await couponctl(settings, "--json", "reconcile", str(coupon.id))
    assert code == 0, err
    assert orjson.loads(out)[0]["repaired"] is False
    assert await _state_keys(redis, coupon.id) == {key: int(key == k.meta) for key in k.all()}

    # Again: harmless, and recorded once.
    code, out, err = await couponctl(settings, "--json", "coupon", "retire", str(coupon.id))
    assert code == 0, err
    assert orjson.loads(out)["already"] is True
    log = await audit.entries(pool, coupon_id=coupon.id)
    retirements = [e for e in log if e["action"] == "retire"]
    assert [(e["actor"], e["origin"]) for e in retirements] == [("admin", "admin-api")]
    assert retirements[0]["before"] == {
        "requested": 3, "reserved": 2, "dead_lettered": 1, "issued_quantity": 2,
    }  # fmt: skip
    await check_invariants.retired(coupon, before, accepted={1, 2, 3})


async def test_a_rebuild_after_state_loss_restores_only_the_marker(
    client: TestClient[Any, Any], make_coupon: CouponFactory, redis: Redis, pool: aiomysql.Pool,
    settings: Settings, check_invariants: Checker,
) -> None:
    finished = await _ending_soon(make_coupon, 10, WINDOW_SECONDS)
    live = await make_coupon(10)
    for coupon in (finished, live):
        assert (await issue(client, coupon.id, 1))[0] == 202
    await drain(redis, pool, settings)
    await _wait_until_ended(redis, finished)
    before = await check_invariants(finished, accepted={1}, rejected=set())
    await retire_coupon(pool, redis, finished.id, actor=TEST_ACTOR)

    await redis.flushall()  # Redis lost its data
    response = await client.get(f"/v1/coupons/{finished.id}/issues/1")
    await assert_problem(response, 503)
    code, _, err = await couponctl(settings, "rebuild", "--all")
    assert code == 0, err

    k = keys.CouponKeys(finished.id)
    assert await _state_keys(redis, finished.id) == {key: int(key == k.meta) for key in k.all()}
    assert {int(raw) for raw in await redis.smembers(keys.ACTIVE_COUPONS)} == {live.id}
    response = await client.get(f"/v1/coupons/{finished.id}/issues/1")
    assert (await response.json())["status"] == "issued"
    assert (await issue(client, live.id, 2))[0] == 202
    await drain(redis, pool, settings)
    await check_invariants(live, accepted={1, 2}, rejected=set(), stream_history_lost=True)
    await check_invariants.retired(finished, before, accepted={1})


async def test_the_worker_retires_finished_coupons_after_the_delay(
    client: TestClient[Any, Any], make_coupon: CouponFactory, redis: Redis, pool: aiomysql.Pool,
    settings: Settings, check_invariants: Checker,
) -> None:
    finished = await _ending_soon(make_coupon, 5, WINDOW_SECONDS)
    live = await make_coupon(5)
    for coupon in (finished, live):
        assert (await issue(client, coupon.id, 1))[0] == 202
    retirer = Retirer(redis, pool, after_seconds=1.0, worker_name="worker-a")
    await _wait_until_ended(redis, finished)
    assert await retirer.retire_due() == []  # ended, but the delay has not passed
    await _wait_until_ended(redis, finished, after_ms=1000)
    assert await retirer.retire_due() == []  # due, but its request is not settled
    await drain(redis, pool, settings)
    before = await check_invariants(finished, accepted={1}, rejected=set())

    stop = asyncio.Event()
    running = asyncio.create_task(retirer.run(stop, interval=0.05))
    try:

        async def retired() -> bool:
            return not await redis.sismember(keys.ACTIVE_COUPONS, str(finished.id))

        await wait_for(retired)
    finally:
        stop.set()
        await running
    assert await redis.sismember(keys.ACTIVE_COUPONS, str(live.id))
    log = await audit.entries(pool, coupon_id=finished.id)
    assert [(e["actor"], e["origin"], e["action"]) for e in log][-1] == (
        "worker-a", "worker", "retire"
    )
    assert [e["action"] for e in await audit.entries(pool, coupon_id=live.id)] == ["create"]
    await check_invariants.retired(finished, before, accepted={1})
    await check_invariants(live, accepted={1}, rejected=set())


async def test_a_retirement_cut_short_is_voided_by_a_change_or_finished_by_the_next_one(
    client: TestClient[Any, Any], make_coupon: CouponFactory, redis: Redis, pool: aiomysql.Pool,
    settings: Settings, check_invariants: Checker,
) -> None:
    coupon = await _ending_soon(make_coupon, 5, WINDOW_SECONDS)
    assert (await issue(client, coupon.id, 1))[0] == 202
    await drain(redis, pool, settings)
    await _wait_until_ended(redis, coupon)
    k = keys.CouponKeys(coupon.id)
    # Sealed in Redis, then cut short before MySQL took the retirement.
    assert (await Scripts(redis).seal(coupon.id, 0)).sealed
    assert await redis.hexists(k.meta, "retired_reserved")
    # MySQL says the coupon lives: moving its window voids the seal, and it issues again.
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    response = await client.patch(
        f"/admin/coupons/{coupon.id}", json={"date_issue_end": later}, headers=ADMIN
    )
    assert response.status == 200, await response.text()
    assert not await redis.hexists(k.meta, "retired_reserved")
    assert (await issue(client, coupon.id, 2))[0] == 202
    await drain(redis, pool, settings)

    # Sealed once more, and this time the next retirement finishes the job.
    ended = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    response = await client.patch(
        f"/admin/coupons/{coupon.id}", json={"date_issue_end": ended}, headers=ADMIN
    )
    assert response.status == 200, await response.text()
    moved = await coupon_rows.fetch_coupon(pool, coupon.id)
    assert moved is not None
    before = await check_invariants(moved, accepted={1, 2}, rejected=set())
    assert (await Scripts(redis).seal(coupon.id, 0)).sealed
    done = await retire_coupon(pool, redis, coupon.id, actor=TEST_ACTOR)
    assert (done.already, done.requested, done.reserved) == (False, 2, 2)
    await check_invariants.retired(moved, before, accepted={1, 2})


async def test_a_coupon_repaired_before_its_retirement_keeps_counters_that_close(
    client: TestClient[Any, Any], make_coupon: CouponFactory, redis: Redis, pool: aiomysql.Pool,
    settings: Settings, check_invariants: Checker,
) -> None:
    coupon = await _ending_soon(make_coupon, 10, WINDOW_SECONDS)
    for user in (1, 2):
        assert (await issue(client, coupon.id, user))[0] == 202
    await drain(redis, pool, settings)
    await _lose_an_acknowledgement(redis, coupon, 3)  # settled, with neither row nor letter
    code, _, err = await couponctl(settings, "reconcile", str(coupon.id), "--repair")
    assert code == 0, err  # re-queued: the stream now counts user 3's request twice
    await drain(redis, pool, settings)
    await _wait_until_ended(redis, coupon)
    before = await check_invariants(coupon, accepted={1, 2, 3}, rejected=set())
    assert (before.requested, before.correction) == (4, 1)
    done = await retire_coupon(pool, redis, coupon.id, actor=TEST_ACTOR)
    assert done.requested == 3  # each accepted request once
    await check_invariants.retired(coupon, before, accepted={1, 2, 3})


async def test_a_reader_lets_go_of_a_retired_stream(
    client: TestClient[Any, Any], make_coupon: CouponFactory, redis: Redis, pool: aiomysql.Pool,
    settings: Settings, check_invariants: Checker,
) -> None:
    finished = await _ending_soon(make_coupon, 5, WINDOW_SECONDS)
    live = await make_coupon(5)
    reader = StreamReader(redis, settings, asyncio.Event())
    await reader.discover()
    assert set(reader._streams.values()) == {finished.id, live.id}
    await _wait_until_ended(redis, finished)
    await retire_coupon(pool, redis, finished.id, actor=TEST_ACTOR)
    await reader.discover()
    assert set(reader._streams.values()) == {live.id}
    assert (await issue(client, live.id, 1))[0] == 202
    assert [coupon for coupon, _, _ in await reader.read(block=False)] == [live.id]


async def test_retiring_100_drops_gives_back_their_redis_memory(
    make_coupon: CouponFactory, redis: Redis, pool: aiomysql.Pool, settings: Settings,
    check_invariants: Checker,
) -> None:
    """Two rounds of 100 drops of 300 users, each retired once drained. Their keys give back
    at least 90 % of the bytes they held (MEMORY USAGE), and so does the server's used_memory
    from the second round on: the first round leaves a one-off ~0.7 MB that redis-server keeps
    after its first burst of keys even when emptied by FLUSHALL (measured on 7.0), and the
    second round, beyond it, shows that nothing grows from drop to drop."""
    drops, users = 100, 300
    after_rounds = []
    for _ in range(2):
        baseline = await _used_memory(redis)
        made = await _drained_drops(make_coupon, redis, pool, settings, drops, users)
        befores = [await check_invariants.snapshot(coupon.id) for coupon in made]
        for coupon in made[:3]:  # a sample; the 100 are checked after their retirement
            await check_invariants(coupon, accepted=range(1, users + 1), rejected=set())
        held_by_keys = await _key_bytes(redis, made)
        held = await _used_memory(redis) - baseline

        for coupon in made:
            done = await retire_coupon(pool, redis, coupon.id, actor=TEST_ACTOR)
            assert done.requested == users
        kept_by_keys = await _key_bytes(redis, made)
        after_rounds.append(await _used_memory(redis))
        freed = held - (after_rounds[-1] - baseline)
        assert held_by_keys - kept_by_keys >= 0.9 * held_by_keys, (held_by_keys, kept_by_keys)
        for coupon, before in zip(made, befores, strict=True):
            assert await redis.exists(*keys.CouponKeys(coupon.id).all()) == 1  # the marker only
            await check_invariants.retired(coupon, before, accepted=range(1, users + 1))
    assert not await redis.exists(keys.ACTIVE_COUPONS)
    assert freed >= 0.9 * held, f"{drops} drops held {held} bytes; retiring gave back {freed}"
    assert after_rounds[1] - after_rounds[0] <= 0.1 * held, f"grew by round: {after_rounds}"


async def _drained_drops(
    make_coupon: CouponFactory,
    redis: Redis,
    pool: aiomysql.Pool,
    settings: Settings,
    drops: int,
    users: int,
) -> list[Coupon]:
    """``drops`` coupons each sold out to ``users`` users, drained, their windows ended."""
    end = datetime.now(UTC) + timedelta(seconds=6)
    start = end - timedelta(minutes=1)
    made = [await make_coupon(users, start=start, end=end) for _ in range(drops)]
    scripts = Scripts(redis)
    for coupon in made:
        outcome = await scripts.reserve(coupon.id, list(range(1, users + 1)))
        assert {r.result.name for r in outcome.reservations} == {"ACCEPTED"}
    await drain(redis, pool, settings, batch_size=2000)
    await _wait_until_ended(redis, made[-1])
    return made


async def _key_bytes(redis: Redis, made: list[Coupon]) -> int:
    """What the coupons' keys take, exactly (MEMORY USAGE ... SAMPLES 0)."""
    total = 0
    for coupon in made:
        for key in keys.CouponKeys(coupon.id).all():
            total += await redis.memory_usage(key, samples=0) or 0
    return total


async def _used_memory(redis: Redis) -> int:
    info: Any = await redis.info("memory")
    return int(info["used_memory"])
