"""Recovery tools on real servers: Redis state loss and ``couponctl rebuild``, ``reconcile``,
the dead-letter tools, and the start-up checks of what the service requires of Redis."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import orjson
import pytest

from gateway.app import create_app
from shared import keys
from tests.helpers import ADMIN, REPO, couponctl, drain, issue, row_count


async def statuses(client: Any, coupon_id: int, users: range) -> dict[int, int]:
    answers = await asyncio.gather(*(issue(client, coupon_id, user) for user in users))
    return {user: status for user, (status, _) in zip(users, answers, strict=True)}


# ------------------------------------------------------------------------------------------
# Redis state loss and rebuild


async def test_lost_redis_state_answers_503_until_rebuilt_and_never_resells(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=50)
    first = await statuses(client, coupon.id, range(1, 31))
    assert set(first.values()) == {202}
    await drain(redis, pool, settings)
    await redis.flushall()  # Redis restarted with nothing: marker, snapshot, sets all gone

    status, body = await issue(client, coupon.id, 1000)
    assert (status, body["code"]) == (503, "FAIL_COUPON_ISSUE_REQUEST")
    assert (await client.get(f"/v1/coupons/{coupon.id}/issues/1")).status == 503
    assert (await client.get(f"/v1/coupons/{coupon.id}")).status == 503
    ready = await client.get("/readyz")
    assert (ready.status, (await ready.json())["redis"]) == (503, "state_lost")
    create = await client.post("/admin/coupons", headers=ADMIN, json={"title": "x"})
    assert create.status in (400, 503)  # a valid body would be refused with 503 as well

    code, out, err = await couponctl(settings, "--json", "rebuild", str(coupon.id))
    assert code == 0, err
    (report,) = orjson.loads(out)
    assert (report["issued"], report["queued"], report["remaining"]) == (30, 0, 20)
    # Winners stay winners; the remaining 20 sell to new users, not one more.
    again = await statuses(client, coupon.id, range(1, 31))
    assert set(again.values()) == {409}
    fresh = await statuses(client, coupon.id, range(100, 140))
    assert sorted(fresh.values()).count(202) == 20
    await drain(redis, pool, settings)
    accepted = set(first) | {u for u, s in fresh.items() if s == 202}
    rejected = {u for u, s in fresh.items() if s != 202}
    snapshot = await check_invariants(
        coupon, accepted=accepted, rejected=rejected, stream_history_lost=True
    )
    assert snapshot.issued_quantity == 50


async def test_rebuild_keeps_slots_of_requests_still_in_the_stream(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=10)
    assert set((await statuses(client, coupon.id, range(1, 4))).values()) == {202}
    await drain(redis, pool, settings)
    assert set((await statuses(client, coupon.id, range(4, 8))).values()) == {202}
    # The stream survived, the sets and the snapshot did not.
    k = keys.CouponKeys(coupon.id)
    await redis.delete(k.meta, k.users, k.issued)
    code, out, err = await couponctl(settings, "--json", "rebuild", str(coupon.id))
    assert code == 0, err
    assert orjson.loads(out)[0] | {"coupon_id": 0} == {
        "coupon_id": 0, "issued": 3, "queued": 4, "remaining": 3,
    }  # fmt: skip
    assert (await issue(client, coupon.id, 5))[0] == 409  # still holds its slot
    assert set((await statuses(client, coupon.id, range(20, 25))).values()) == {202, 409}
    await drain(redis, pool, settings)
    snapshot = await check_invariants(coupon, accepted=range(1, 8))
    assert len(snapshot.rows) == 10


async def test_rebuild_all_marks_redis_whole_again(client, redis, pool, settings, make_coupon):
    coupons_made = [await make_coupon(total=5) for _ in range(3)]
    await redis.flushall()
    code, out, err = await couponctl(settings, "--json", "rebuild", "--all")
    assert code == 0, err
    assert [r["coupon_id"] for r in orjson.loads(out)] == [c.id for c in coupons_made]
    ready = await client.get("/readyz")
    assert ready.status == 200, await ready.text()
    assert (await issue(client, coupons_made[0].id, 1))[0] == 202
    assert (await client.get("/v1/coupons/424242")).status == 404
    await drain(redis, pool, settings)


async def test_rebuild_of_unknown_coupon_fails_in_one_line(settings, pool, redis):
    code, _, err = await couponctl(settings, "rebuild", "424242")
    assert code == 4  # not found
    assert err.strip() == "couponctl: coupon 424242 does not exist"


# ------------------------------------------------------------------------------------------
# reconcile


async def test_reconcile_of_a_healthy_drained_coupon_finds_nothing(
    client, redis, pool, settings, make_coupon
):
    coupon = await make_coupon(total=5)
    assert set((await statuses(client, coupon.id, range(1, 8))).values()) == {202, 409}
    await drain(redis, pool, settings)
    code, out, err = await couponctl(settings, "--json", "reconcile", str(coupon.id))
    assert code == 0, err
    (report,) = orjson.loads(out)
    assert report["repaired"] is False
    assert all(report[name] == 0 for name in report["details"])


async def test_reconcile_reports_each_drift_class_and_repairs_it(
    client, redis, pool, settings, make_coupon, check_invariants, tmp_path
):
    coupon = await make_coupon(total=20)
    assert set((await statuses(client, coupon.id, range(1, 6))).values()) == {202}
    await drain(redis, pool, settings)
    k = keys.CouponKeys(coupon.id)
    # issued_not_in_redis: user 1 has a row but lost its slot and mark.
    await redis.srem(k.users, 1)
    await redis.srem(k.issued, 1)
    # orphan_slot: user 99 holds a slot with no request at all.
    await redis.sadd(k.users, 99)
    # accepted_missing: an acknowledged request for user 50 that never became a row.
    lost_id = await redis.xadd(k.requests, {"c": coupon.id, "u": 50, "t": 1})
    await redis.xreadgroup(keys.GROUP, "ghost", {k.requests: ">"})
    await redis.xack(k.requests, keys.GROUP, lost_id)
    await redis.sadd(k.users, 50)
    # counter_mismatch
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE coupons SET issued_quantity = 3 WHERE id = %s", (coupon.id,))
        await conn.commit()

    metrics_file = tmp_path / "drift.prom"
    code, out, err = await couponctl(
        settings, "--json", "reconcile", str(coupon.id), "--metrics-file", str(metrics_file)
    )
    assert code == 3, err
    (report,) = orjson.loads(out)
    assert {name: report[name] for name in report["details"]} == {
        "accepted_missing": 1, "issued_not_in_redis": 1, "dead_slot_held": 0,
        "orphan_slot": 1, "counter_mismatch": 1,
    }  # fmt: skip
    assert report["details"]["accepted_missing"] == [lost_id]
    text = metrics_file.read_text()
    assert 'coupon_reconcile_drift{drift_class="orphan_slot"} 1.0' in text

    code, out, err = await couponctl(settings, "--json", "reconcile", str(coupon.id), "--repair")
    assert code == 0, err
    assert orjson.loads(out)[0]["repaired"] is True
    await drain(redis, pool, settings)  # the re-queued request for user 50 becomes a row
    code, out, err = await couponctl(settings, "--json", "reconcile", str(coupon.id))
    assert code == 0, (out, err)
    assert await row_count(pool, coupon.id) == 6
    # I5 counts the hand-made lost entry too: it was acknowledged without a row, and its
    # replacement is the row, so check the rest of the invariants directly.
    snapshot = await check_invariants.snapshot(coupon.id)
    assert snapshot.slot_holders == set(snapshot.rows) == {1, 2, 3, 4, 5, 50}
    assert snapshot.issued_quantity == 6
    assert 99 in snapshot.marked_failed


# ------------------------------------------------------------------------------------------
# dead letters


async def test_dead_release_list_and_replay_a_stuck_request(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=3)
    status, body = await issue(client, coupon.id, 7)
    assert status == 202
    k = keys.CouponKeys(coupon.id)
    # A consumer that read the request and will never come back.
    await redis.xreadgroup(keys.GROUP, "ghost", {k.requests: ">"})
    code, out, err = await couponctl(
        settings, "--json", "dead", "release", str(coupon.id), body["request_id"]
    )
    assert code == 0, err
    assert orjson.loads(out)["result"] == "dead_lettered"
    status_response = await client.get(f"/v1/coupons/{coupon.id}/issues/7")
    assert (await status_response.json())["status"] == "failed"

    code, out, err = await couponctl(settings, "--json", "dead", "list", str(coupon.id))
    assert code == 0, err
    (letter,) = orjson.loads(out)
    assert (letter["source_id"], letter["user_id"], letter["reason"]) == (
        body["request_id"], 7, "operator",
    )  # fmt: skip
    assert letter["user_status"] == "failed"

    code, out, err = await couponctl(settings, "--json", "dead", "replay", str(coupon.id))
    assert code == 0, err
    (replayed,) = orjson.loads(out)
    assert replayed["result"] == "queued"
    await drain(redis, pool, settings)
    snapshot = await check_invariants(coupon, accepted={7})
    assert snapshot.rows == {7: replayed["request_id"]}
    # Replaying again finds the user holding a slot: nothing happens.
    code, out, err = await couponctl(settings, "--json", "dead", "replay", str(coupon.id))
    assert orjson.loads(out)[0]["result"] == "holding"


async def test_dead_release_of_a_settled_request_does_nothing(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=3)
    _, body = await issue(client, coupon.id, 8)
    await drain(redis, pool, settings)
    code, out, err = await couponctl(
        settings, "--json", "dead", "release", str(coupon.id), body["request_id"]
    )
    assert code == 0, err
    assert orjson.loads(out)["result"] == "not_pending"
    code, out, err = await couponctl(settings, "dead", "release", str(coupon.id), "1-1")
    assert code == 1
    assert "no request 1-1" in err
    await check_invariants(coupon, accepted={8})


# ------------------------------------------------------------------------------------------
# start-up checks


@pytest.mark.parametrize(
    ("module", "program"), [("gateway", "coupon-gateway"), ("stream_worker", "coupon-worker")]
)
async def test_processes_refuse_a_redis_that_may_evict(module, program, settings, redis):
    await redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
        env.update(settings.replace(http_port=1, log_level="error").to_env())
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        await redis.config_set("maxmemory-policy", "noeviction")
    assert process.returncode == 2, err
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{program}: configuration error: Redis maxmemory-policy")


async def test_worker_warns_when_redis_has_no_append_only_file(settings, redis, pool):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env.update(settings.replace(log_format="json").to_env())
    assert (await redis.config_get("appendonly"))["appendonly"] == "no"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream_worker", "--burst", cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err
    events = [
        orjson.loads(line)["event"] for line in err.decode().splitlines() if line.startswith("{")
    ]
    assert "redis_durability_weak" in events


async def test_redis_state_from_before_the_marker_existed_is_kept(
    aiohttp_client, settings, redis, pool, make_coupon, check_invariants
):
    coupon = await make_coupon(total=5)
    await redis.delete(keys.STATE_MARKER)  # as written by a version without the marker
    client = await aiohttp_client(create_app(settings))
    assert (await client.get("/readyz")).status == 200
    assert await redis.exists(keys.STATE_MARKER)
    assert (await issue(client, coupon.id, 1))[0] == 202
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted={1})
