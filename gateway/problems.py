"""Rendering of every error as ``application/problem+json`` (RFC 9457), and the access log."""

from __future__ import annotations

import asyncio
import functools
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import Histogram
from pymysql.err import MySQLError
from redis.exceptions import RedisError

from shared import metrics
from shared.errors import AppError, Unavailable

log = structlog.get_logger("gateway.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PROBLEM_TYPE = "https://coupon-drop.example/problems/"
SERVER = "coupon-gateway"
"""The ``Server`` header of every answer: no version for an attacker to look up."""

# A store that fails a request the route did not handle itself (an admin route during a MySQL
# or Redis outage): a 503 the client may retry, never a 500 with the driver's words.
STORE_ERRORS = (RedisError, MySQLError, OSError, asyncio.TimeoutError)


def problem_response(
    status: int, code: str, title: str, detail: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_problem_body(status, code, title, detail),
        status=status,
        content_type="application/problem+json",
        headers=headers,
    )


@functools.lru_cache(maxsize=4096)
def _problem_body(status: int, code: str, title: str, detail: str) -> bytes:
    """The rendered body. During a drop nearly every answer is one of a few identical
    rejections ("coupon 7 is sold out"), so each distinct body is rendered once; bounded, as
    details may name a user."""
    return orjson.dumps(
        {
            "type": PROBLEM_TYPE + code.lower().replace("_", "-"),
            "title": title,
            "status": status,
            "detail": detail,
            "code": code,
        }
    )


def internal_error(status: int = 500) -> web.Response:
    """The one answer to an error nobody expected: it says nothing of the error itself."""
    return problem_response(
        status,
        "FAIL_COUPON_ISSUE_REQUEST",
        "Internal error",
        "An unexpected error occurred; it has been logged.",
    )


def render(error: AppError) -> web.Response:
    response = problem_response(
        error.status, error.code, error.title, error.detail, headers=error.headers()
    )
    if error.close_connection:
        response.force_close()
    return response


def _http_code(status: int) -> str:
    if status == 404:
        return "NOT_FOUND"
    if status == 405:
        return "METHOD_NOT_ALLOWED"
    if status == 413:
        return "INVALID_REQUEST"
    return "INVALID_REQUEST" if status < 500 else "FAIL_COUPON_ISSUE_REQUEST"


def sampled_log(handler: Handler) -> Handler:
    """Mark a route whose requests are logged only at ``COUPON_REQUEST_LOG_SAMPLE`` (5xx always):
    the routes a drop hammers, where a line per request would cost more than the answer."""
    _SAMPLED_HANDLERS.add(handler)
    return handler


_SAMPLED_HANDLERS: set[Handler] = set()


REQUEST_ID = web.RequestKey("request_id", str)
"""Where the middleware keeps the request's id on the request (for :func:`stream_headers`)."""


def stream_headers(request: web.Request) -> dict[str, str]:
    """The headers the middleware adds to every answer, for a streamed one: its headers are
    sent when it is prepared, before the middleware sees it again."""
    return {"X-Request-ID": request.get(REQUEST_ID, ""), "Server": SERVER}


def request_id_of(request: web.Request) -> str:
    """The caller's ``X-Request-ID`` when it is printable ASCII (cut to 128 characters), else a
    new random one: the id is echoed in a header and written to the log, where anything else (a
    stray ``\\xff`` byte) would break the answer or the line. Random, not a counter, so the ids
    a client sees do not tell how many requests the service takes."""
    raw = request.headers.get("X-Request-ID")
    if raw and raw.isascii() and raw.isprintable():
        return raw[:128]
    return secrets.token_hex(8)


def problem_middleware(sample: float) -> Middleware:
    """Turn every error into problem+json, time every request, and log it: every request on
    most routes, a ``sample`` share of those on :func:`sampled_log` routes, every 5xx."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request_id_of(request)
        request[REQUEST_ID] = request_id
        response: web.StreamResponse
        try:
            response = await handler(request)
        except AppError as error:
            response = render(error)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # 405 must say which methods are allowed (RFC 9110 §15.5.6).
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = problem_response(
                exc.status, _http_code(exc.status), exc.reason, exc.text or exc.reason,
                headers=allow,
            )  # fmt: skip
        except STORE_ERRORS as exc:
            log.warning(
                "store_unavailable", request_id=request_id, path=request.path,
                error=type(exc).__name__,
            )  # fmt: skip
            response = render(Unavailable("a data store did not answer; try again later"))
        except Exception:
            log.exception("unhandled_error", request_id=request_id, path=request.path)
            response = internal_error()
        headers = response.headers
        headers["X-Request-ID"] = request_id
        headers["Server"] = SERVER  # aiohttp would name itself, its version and Python's
        elapsed = time.perf_counter() - started
        match_info = request.match_info
        status = response.status
        resource = match_info.route.resource
        route = "unmatched" if resource is None else resource.canonical
        _latency(route, status).observe(elapsed)
        if match_info.handler not in _SAMPLED_HANDLERS or status >= 500:
            log.info(
                "http_request", request_id=request_id, method=request.method, route=route,
                status=status, duration_ms=round(elapsed * 1000, 3),
            )  # fmt: skip
        elif sample and random.random() < sample:  # noqa: S311 - a log sample, not a secret
            log.info(
                "http_request", request_id=request_id, method=request.method, route=route,
                status=status, duration_ms=round(elapsed * 1000, 3), sample=sample,
            )  # fmt: skip
        return response

    return middleware


@functools.cache
def _latency(route: str, status: int) -> Histogram:
    """The latency series of a route and status class (a bounded set: routes x classes);
    looked up once, as ``labels()`` costs more than the observation itself."""
    return metrics.HTTP_REQUEST_SECONDS.labels(route, f"{status // 100}xx")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")
