"""The happy path end to end: HTTP 202 -> stream -> worker -> one MySQL row."""

from __future__ import annotations

from tests.helpers import drain, issue


async def test_accepted_request_becomes_exactly_one_row(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=10)
    status, body = await issue(client, coupon.id, 7)
    assert status == 202, body
    assert body["status"] == "accepted"
    assert body["request_id"]
    status_resp = await client.get(f"/v1/coupons/{coupon.id}/issues/7")
    assert (await status_resp.json())["status"] == "pending"
    await drain(redis, pool, settings)
    status_resp = await client.get(f"/v1/coupons/{coupon.id}/issues/7")
    assert (await status_resp.json())["status"] == "issued"
    await check_invariants(coupon, accepted={7})
