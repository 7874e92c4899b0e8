"""The seed's routes, so the original system's clients and locust files work unchanged.

Body ``{"userId": <int>, "couponId": <int>}``; answer ``200 {"isSuccess": true}``, or
``200 {"isSuccess": false, "comment": "<the seed's Korean message>"}`` for a business rejection,
as the seed did. Malformed input is a 400 and an unavailable pipeline a 503, both problem+json
(the seed answered 0-defaults and raw 500s there).

``/v1/issue`` is the seed's synchronous path: it reserves in Redis exactly like the async routes
(so mixing the paths on one coupon can never oversell or double-issue), then commits the row
itself, in one MySQL transaction under ``SELECT … FOR UPDATE`` on the coupon row, before it
answers. The stream entry stays the durable record: if that commit fails, the worker commits the
same entry later, so a ``true`` is never a lie.
"""

from __future__ import annotations

import asyncio

import orjson
import structlog
from aiohttp import web

from gateway import appkeys, auth
from gateway.bodies import json_object
from gateway.outcomes import counted
from gateway.problems import sampled_log
from shared import keys
from shared.errors import CouponNotFound, Rejection, SoldOut
from shared.ids import json_id
from shared.mysql import issue_store
from shared.mysql.issue_store import Entry
from shared.redis.scripts import Reservation

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

# How long /v1/issue waits for its own MySQL commit before leaving the entry to the workers.
SYNC_COMMIT_TIMEOUT_SECONDS = 2.0

_SUCCESS = orjson.dumps({"isSuccess": True})


def _answer(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


def _refused(rejection: Rejection | type[Rejection]) -> web.Response:
    return _answer(orjson.dumps({"isSuccess": False, "comment": rejection.seed_message}))


async def _decide(request: web.Request) -> tuple[int, int, Reservation]:
    """Parse the seed's body, pass the gate (rate limits and identity), reserve; counted once.
    A missing or non-integer field is a 400; a business "no" raises a :class:`Rejection`."""
    with counted():
        body = await json_object(request)
        coupon_id = json_id(body.get("couponId"), "couponId")
        user_id = auth.issuing_user(request, body, "userId")
        reservation = await request.app[appkeys.ISSUER].issue(coupon_id, user_id)
    return coupon_id, user_id, reservation


@routes.post("/v1/issue-async")
@routes.post("/v2/issue-async")
@sampled_log
async def issue_async(request: web.Request) -> web.Response:
    """The native async path in the seed's shapes."""
    try:
        await _decide(request)
    except Rejection as rejection:
        return _refused(rejection)
    return _answer(_SUCCESS)


@routes.post("/v1/issue")
@sampled_log
async def issue_sync(request: web.Request) -> web.Response:
    """Reserve, then commit the row before answering (the seed's FOR UPDATE path)."""
    try:
        coupon_id, user_id, reservation = await _decide(request)
    except Rejection as rejection:
        return _refused(rejection)
    entry = Entry(coupon_id, reservation.request_id, user_id, reservation.accepted_ms)
    try:
        result = await asyncio.wait_for(
            issue_store.write_batch(request.app[appkeys.MYSQL], [entry]),
            SYNC_COMMIT_TIMEOUT_SECONDS,
        )
    except Exception as exc:
        # Accepted and durably queued: the workers commit it. The answer stays true.
        log.warning("sync_commit_deferred", coupon_id=coupon_id, error=repr(exc))
        return _answer(_SUCCESS)
    if result.to_dead_letter:
        # MySQL's cap disagreed with Redis; the worker dead-letters the entry and frees the slot.
        return _refused(SoldOut)
    if result.unknown_coupon:
        return _refused(CouponNotFound)
    try:
        # Shown issued at once; the entry stays pending until a worker acknowledges it, and the
        # worker's acknowledgement marks :issued, so the balance never counts it twice.
        await request.app[appkeys.REDIS].sadd(keys.CouponKeys(coupon_id).sync_issued, user_id)
    except Exception as exc:  # only the status view lags; the worker's ack sets it too
        log.warning("sync_issued_mark_deferred", coupon_id=coupon_id, error=repr(exc))
    return _answer(_SUCCESS)


@routes.get("/hello")
async def hello(request: web.Request) -> web.Response:
    """The seed's baseline endpoint (its locust files measure the bare server with it)."""
    return web.Response(text="hello!")
