"""``couponctl`` for a whole drop: list, update, pause, resume and the live status view, each
run as a real subprocess against the session's Redis and MariaDB."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import orjson

from tests.helpers import couponctl, drain, issue


async def test_list_shows_every_coupon_as_a_table_and_as_json(settings, make_coupon):
    made = [await make_coupon(total=n, title=f"drop {n}") for n in (3, 7)]
    code, out, err = await couponctl(settings, "--json", "coupon", "list")
    assert code == 0, err
    assert [c["id"] for c in orjson.loads(out)] == [c.id for c in made]
    code, out, err = await couponctl(settings, "coupon", "list", "--after", str(made[0].id))
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["id", "title", "total_quantity", "issued_quantity", "paused"]
    assert len(rows) == 1
    assert rows[0].split()[0] == str(made[1].id)


async def test_update_tops_up_a_sold_out_coupon(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=1)
    assert (await issue(client, coupon.id, 1))[0] == 202
    assert (await issue(client, coupon.id, 2))[0] == 409
    code, out, err = await couponctl(
        settings, "--json", "coupon", "update", str(coupon.id), "--total", "2"
    )
    assert code == 0, err
    assert orjson.loads(out)["total_quantity"] == 2
    assert (await issue(client, coupon.id, 2))[0] == 202
    await drain(redis, pool, settings)
    snapshot = await check_invariants(
        dataclasses.replace(coupon, total_quantity=2), accepted={1, 2}
    )
    assert snapshot.issued_quantity == 2


async def test_update_moves_the_window_and_refuses_nonsense(settings, client, make_coupon):
    coupon = await make_coupon(total=5)
    later = datetime.now(UTC) + timedelta(minutes=30)  # the window ends in an hour
    code, out, err = await couponctl(
        settings, "--json", "coupon", "update", str(coupon.id), "--start", later.isoformat()
    )
    assert code == 0, err
    status, body = await issue(client, coupon.id, 1)
    assert (status, body["code"]) == (409, "INVALID_COUPON_ISSUE_DATE")
    for args in (
        ["--total", "-1"],
        ["--end", (later - timedelta(minutes=1)).isoformat()],
        ["--start", "2030-01-01T00:00:00"],
        [],
    ):
        code, out, err = await couponctl(settings, "coupon", "update", str(coupon.id), *args)
        assert code != 0, args
        assert out == "", (args, out)
        assert len(err.strip().splitlines()) == 1, (args, err)
        assert "Traceback" not in err, (args, err)


async def test_pause_and_resume(client, redis, pool, settings, make_coupon, check_invariants):
    coupon = await make_coupon(total=5)
    code, _, err = await couponctl(settings, "coupon", "pause", str(coupon.id))
    assert code == 0, err
    status, body = await issue(client, coupon.id, 1)
    assert (status, body["code"]) == (409, "COUPON_PAUSED")
    code, _, err = await couponctl(settings, "coupon", "resume", str(coupon.id))
    assert code == 0, err
    assert (await issue(client, coupon.id, 2))[0] == 202
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted={2}, rejected={1})


async def test_pause_of_unknown_coupon_fails_in_one_line(settings, pool, redis):
    code, out, err = await couponctl(settings, "coupon", "pause", "424242")
    assert code != 0
    assert out == ""
    assert err.strip() == "couponctl: coupon 424242 does not exist"


async def test_status_prints_one_refresh_per_interval(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=10)
    for user in (1, 2, 3):
        assert (await issue(client, coupon.id, user))[0] == 202
    await drain(redis, pool, settings)
    code, out, err = await couponctl(
        settings, "--json", "status", str(coupon.id), "--interval", "0.05", "--count", "3"
    )
    assert code == 0, err
    refreshes = [orjson.loads(line) for line in out.splitlines()]
    assert len(refreshes) == 3
    last = refreshes[-1]
    assert (last["requested"], last["issued"], last["pending"], last["remaining"]) == (3, 3, 0, 7)
    assert refreshes[0]["rate_per_s"] is None
    assert last["rate_per_s"] == 0.0
    code, out, err = await couponctl(
        settings, "status", str(coupon.id), "--interval", "0.05", "--count", "2"
    )
    assert code == 0, err
    _title, header, *rows = out.splitlines()
    assert "requested" in header
    assert len(rows) == 2
    await check_invariants(coupon, accepted={1, 2, 3})
