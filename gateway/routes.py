"""Native public routes: issue, status, coupon snapshot, live feed, health."""

from __future__ import annotations

from aiohttp import web
from redis.exceptions import RedisError

from gateway import appkeys, auth, health
from gateway.bodies import json_object
from gateway.outcomes import counted
from gateway.problems import json_response, sampled_log
from shared import keys
from shared.errors import (
    CouponNotFound,
    IssueNotFound,
    RedisStateLost,
    Unavailable,
)
from shared.ids import parse_id
from shared.mysql import coupon_rows

routes = web.RouteTableDef()


@routes.post("/v1/coupons/{coupon_id}/issues")
@sampled_log
async def issue(request: web.Request) -> web.Response:
    """Reserve the coupon for the user; 202 means the request is durably queued."""
    with counted():
        coupon_id = parse_id(request.match_info["coupon_id"], "coupon_id")
        # Rate limits and identity (401/403/429) are settled here, before any reservation.
        user_id = auth.issuing_user(request, await json_object(request), "user_id")
        reservation = await request.app[appkeys.ISSUER].issue(coupon_id, user_id)
    return json_response(
        {
            "coupon_id": coupon_id,
            "user_id": user_id,
            "status": "accepted",
            "request_id": reservation.request_id,
        },
        status=202,
    )


@routes.get("/v1/coupons/{coupon_id}/issues/{user_id}")
@sampled_log
async def issue_status(request: web.Request) -> web.Response:
    """pending, issued or failed, answered from Redis alone; for a retired coupon (whose
    Redis sets are gone), from MySQL."""
    request.app[appkeys.LIMITS].check_reader(request)
    coupon_id = parse_id(request.match_info["coupon_id"], "coupon_id")
    user_id = parse_id(request.match_info["user_id"], "user_id")
    auth.check_user(request, user_id)
    k = keys.CouponKeys(coupon_id)
    try:
        async with request.app[appkeys.REDIS].pipeline(transaction=False) as pipe:
            pipe.hmget(k.meta, "id", "retired_reserved")
            pipe.sismember(k.issued, str(user_id))
            pipe.sismember(k.users, str(user_id))
            pipe.sismember(k.failed, str(user_id))
            pipe.exists(keys.STATE_MARKER)
            pipe.sismember(k.sync_issued, str(user_id))  # committed by POST /v1/issue itself
            (exists, retired), issued, holding, failed, marked, sync = await pipe.execute()
    except (RedisError, OSError):
        raise Unavailable("Redis is unreachable") from None
    if not exists:
        if not marked:
            raise RedisStateLost("Redis lost the coupon state; an operator must rebuild it")
        raise CouponNotFound(f"coupon {coupon_id} does not exist")
    status: str | None
    if issued or sync:
        status = "issued"
    elif holding:
        status = "pending"
    elif failed:
        status = "failed"
    else:
        # A MySQL outage here is a 503 (the problem middleware): a retired coupon's answers
        # live in MySQL only.
        mysql = request.app[appkeys.MYSQL]
        status = await coupon_rows.retired_outcome(mysql, coupon_id, user_id) if retired else None
    if status is None:
        raise IssueNotFound(f"user {user_id} never requested coupon {coupon_id}")
    return json_response({"coupon_id": coupon_id, "user_id": user_id, "status": status})


@routes.get("/v1/coupons/{coupon_id}")
@sampled_log
async def coupon_snapshot(request: web.Request) -> web.Response:
    """The public view of a coupon: title, window, total, remaining, sold_out."""
    request.app[appkeys.LIMITS].check_reader(request)
    coupon_id = parse_id(request.match_info["coupon_id"], "coupon_id")
    redis = request.app[appkeys.REDIS]
    try:
        coupon = await request.app[appkeys.SNAPSHOTS].get(coupon_id)
        if coupon is None or coupon.retired_reserved is not None:  # retired: its count is kept
            reserved = 0 if coupon is None else coupon.retired_reserved or 0
        else:
            reserved = int(await redis.scard(keys.CouponKeys(coupon_id).users))
    except (RedisError, OSError):
        raise Unavailable("Redis is unreachable") from None
    if coupon is None:
        raise CouponNotFound(f"coupon {coupon_id} does not exist")
    total = coupon.total_quantity
    remaining = None if total is None else max(total - reserved, 0)
    return json_response({**coupon.public(), "remaining": remaining, "sold_out": remaining == 0})


@routes.get("/v1/coupons/{coupon_id}/events")
@sampled_log  # one line per subscriber that leaves would flood the log at a gateway's stop
async def coupon_events(request: web.Request) -> web.StreamResponse:
    """The coupon's live feed (Server-Sent Events): public, like the snapshot route, so it
    needs no identity and is rate-limited per client address."""
    request.app[appkeys.LIMITS].check_reader(request)
    coupon_id = parse_id(request.match_info["coupon_id"], "coupon_id")
    return await request.app[appkeys.FEED].stream(request, coupon_id)


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop turns."""
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready to accept: Redis (with its state) answers; MySQL's state is reported, not required
    (see :mod:`gateway.health`)."""
    ready, body = await health.readiness(request.app[appkeys.REDIS], request.app[appkeys.MYSQL])
    return json_response(body, status=200 if ready else 503)
