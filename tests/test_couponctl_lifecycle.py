"""``couponctl`` for a whole drop: list, update, pause, resume and the live status view, each
run as a real subprocess against the session's Redis and MariaDB."""

from __future__ import annotations

import dataclasses
import importlib.metadata
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


async def test_json_works_before_and_after_the_command(settings, make_coupon):
    coupon = await make_coupon(total=4, title="json anywhere")
    shown = []
    for args in (
        ["--json", "coupon", "show", str(coupon.id)],
        ["coupon", "show", str(coupon.id), "--json"],
        ["coupon", "show", "--json", str(coupon.id)],
    ):
        code, out, err = await couponctl(settings, *args)
        assert code == 0, (args, err)
        shown.append(orjson.loads(out))
    assert all(row == shown[0] for row in shown)
    assert shown[0]["id"] == coupon.id


async def test_version_and_help_are_plain_text(settings):
    code, out, err = await couponctl(settings, "--version")
    version = importlib.metadata.version("coupon-drop")
    assert (code, out.strip()) == (0, f"couponctl {version}"), err
    code, out, err = await couponctl(settings, "--help")
    assert code == 0, err
    assert "``" not in out
    assert "exit codes" in out


async def test_exit_codes_tell_usage_not_found_unreachable_and_refused_apart(
    settings, make_coupon
):
    code, _, err = await couponctl(settings, "coupon", "show")
    assert code == 2, err  # usage
    code, _, err = await couponctl(settings, "coupon", "show", "424242")
    assert code == 4, err  # not found
    assert err.strip() == "couponctl: coupon 424242 does not exist"
    unreachable = settings.replace(
        mysql_url="mysql://u:p@127.0.0.1:1/nothing", redis_url="redis://127.0.0.1:1/0"
    )
    code, _, err = await couponctl(unreachable, "coupon", "show", "1")
    assert code == 5, err  # Redis or MySQL cannot be reached
    assert err.startswith("couponctl: cannot reach a server")
    coupon = await make_coupon(total=4)
    code, _, err = await couponctl(settings, "coupon", "update", str(coupon.id), "--total", "-1")
    assert code == 1, err  # refused: a bad value
