"""Admin routes, behind ``Authorization: Bearer $COUPON_ADMIN_TOKEN``."""

from __future__ import annotations

import dataclasses
import hmac

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from gateway import appkeys
from gateway.bodies import json_object
from gateway.problems import json_response, stream_headers
from shared.coupon_requests import CouponChange, NewCoupon, idempotency_key
from shared.errors import Unauthorized, Unavailable
from shared.ids import MAX_ID, parse_decimal, parse_id
from shared.ops import audit, coupons, retire, winners
from shared.ops.audit import Actor

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()


def require_admin_path(request: web.Request) -> None:
    """404 unless the path says ``/admin/`` literally: aiohttp decodes ``/%61dmin/`` to
    ``/admin/``, and a proxy that keeps the admin routes off the internet by prefix would let it
    through."""
    if not request.raw_path.startswith("/admin/"):
        raise web.HTTPNotFound()


def admin_token(request: web.Request, offered: str) -> tuple[str, str] | None:
    """``(token, its name)`` when ``offered`` is one of ``COUPON_ADMIN_TOKENS`` or
    ``COUPON_ADMIN_TOKEN``, else None. Every token is compared, whichever matches, so the time
    taken tells nothing."""
    found = None
    for token, actor in request.app[appkeys.SETTINGS].admin_actors.items():
        if hmac.compare_digest(offered.encode(), token.encode()):
            found = (token, actor)
    return found


def bearer_admin(request: web.Request) -> str | None:
    """The name of the admin token the request's ``Authorization: Bearer`` header carries."""
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    found = admin_token(request, presented.strip()) if scheme.lower() == "bearer" else None
    return None if found is None else found[1]


def require_admin(request: web.Request) -> Actor:
    """The admin a request acts for, by its bearer token; 401 otherwise, and for everything
    when no token is configured (see :func:`require_admin_path` for the path)."""
    require_admin_path(request)
    name = bearer_admin(request)
    if name is None:
        raise Unauthorized("a valid admin bearer token is required")
    return Actor(name, "admin-api")


@routes.post("/admin/coupons")
async def create_coupon(request: web.Request) -> web.Response:
    """Create a coupon. With an ``Idempotency-Key`` header, a retry with the same key and body
    answers the first coupon again (``Idempotent-Replayed: true``) instead of making a second."""
    actor = require_admin(request)
    raw_key = request.headers.get("Idempotency-Key")
    key = None if raw_key is None else idempotency_key(raw_key)
    new = NewCoupon.from_json(await json_object(request))
    pool, redis = request.app[appkeys.MYSQL], request.app[appkeys.REDIS]
    if key is None:
        coupon = await coupons.create_coupon(pool, redis, new, actor=actor)
        return json_response(coupon.public(), status=201)
    coupon, replayed = await coupons.create_coupon_once(pool, redis, new, key, actor=actor)
    response = json_response(coupon.public(), status=201)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@routes.get("/admin/coupons")
async def list_coupons(request: web.Request) -> web.Response:
    """Coupons in id order, a page at a time: ``?after=<last id seen>&limit=1..1000``."""
    require_admin(request)
    after = _query_int(request, "after", default=0, low=0, high=MAX_ID)
    limit = _query_int(request, "limit", default=100, low=1, high=1000)
    page = await coupons.list_coupons(request.app[appkeys.MYSQL], after_id=after, limit=limit)
    next_after = page[-1]["id"] if len(page) == limit else None
    return json_response({"coupons": page, "next_after": next_after})


@routes.patch("/admin/coupons/{coupon_id}")
async def update_coupon(request: web.Request) -> web.Response:
    """Move the window, top up (or lower) the stock, pause or resume; live for every gateway."""
    actor = require_admin(request)
    coupon_id = parse_id(request.match_info["coupon_id"], "coupon_id")
    change = CouponChange.from_json(await json_object(request))
    coupon = await coupons.update_coupon(
        request.app[appkeys.MYSQL], request.app[appkeys.REDIS], coupon_id, change, actor=actor
    )
    return json_response(coupon.public())


@routes.post("/admin/coupons/{coupon_id}/retire")
async def retire_coupon(request: web.Request) -> web.Response:
    """Retire a finished coupon now: refused (409, with the reason) while its window is open or
    a request it accepted is not settled yet."""
    actor = require_admin(request)
    coupon_id = parse_id(request.match_info["coupon_id"], "coupon_id")
    done = await retire.retire_coupon(
        request.app[appkeys.MYSQL], request.app[appkeys.REDIS], coupon_id, actor=actor
    )
    return json_response(dataclasses.asdict(done))


@routes.get("/admin/audit")
async def audit_log(request: web.Request) -> web.Response:
    """Who changed what, oldest first, a page at a time:
    ``?coupon_id=ID&after=<last id seen>&limit=1..1000``."""
    require_admin(request)
    raw_coupon = request.query.get("coupon_id")
    coupon_id = None if raw_coupon is None else parse_id(raw_coupon, "coupon_id")
    after = _query_int(request, "after", default=0, low=0, high=MAX_ID)
    limit = _query_int(request, "limit", default=100, low=1, high=1000)
    page = await audit.entries(
        request.app[appkeys.MYSQL], coupon_id=coupon_id, after_id=after, limit=limit
    )
    next_after = page[-1]["id"] if len(page) == limit else None
    return json_response({"entries": page, "next_after": next_after})


def _query_int(request: web.Request, name: str, *, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    return default if raw is None else parse_decimal(raw, name, low=low, high=high)


@routes.get("/admin/coupons/{coupon_id}")
async def show_coupon(request: web.Request) -> web.Response:
    require_admin(request)
    coupon_id = parse_id(request.match_info["coupon_id"], "coupon_id")
    try:
        shown = await coupons.show_coupon(
            request.app[appkeys.MYSQL], request.app[appkeys.REDIS], coupon_id
        )
    except (RedisError, OSError):
        raise Unavailable("Redis is unreachable") from None
    return json_response(shown)


@routes.get("/admin/coupons/{coupon_id}/winners")
async def coupon_winners(request: web.Request) -> web.StreamResponse:
    """Every winner, streamed from MySQL: CSV with ``Accept: text/csv`` (a header line, then one
    row per winner), JSON lines otherwise; in the order the rows were made."""
    require_admin(request)
    coupon_id = parse_id(request.match_info["coupon_id"], "coupon_id")
    fmt = "csv" if "text/csv" in request.headers.get("Accept", "") else "jsonl"
    rows = await winners.winners(request.app[appkeys.MYSQL], coupon_id)  # 404 before any byte
    response = web.StreamResponse(
        headers={
            **stream_headers(request),
            "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="coupon-{coupon_id}-winners.{fmt}"',
        }
    )
    response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        async for chunk in winners.encoded(rows, fmt):
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionError, OSError):
        pass  # the client went away: nothing left to tell it
    except Exception:
        # The status line is sent: the only way left to say "incomplete" is to cut the body
        # before its last chunk, which every HTTP client reports as an error.
        log.exception("winners_export_failed", coupon_id=coupon_id)
        response.force_close()
        if request.transport is not None:
            request.transport.close()
    finally:
        await rows.aclose()  # a client gone mid-way: the connection is closed, not drained
    return response
