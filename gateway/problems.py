"""Rendering of every error as ``application/problem+json`` (RFC 9457), and the access log."""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from prometheus_client import Histogram

from shared import metrics
from shared.errors import AppError

log = structlog.get_logger("gateway.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PROBLEM_TYPE = "https://coupon-drop.example/problems/"
_request_ids = itertools.count(1)
_prefix = f"{os.getpid():x}"


def problem_response(
    status: int, code: str, title: str, detail: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    body = {
        "type": PROBLEM_TYPE + code.lower().replace("_", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/problem+json",
        headers=headers,
    )


def render(error: AppError) -> web.Response:
    return problem_response(
        error.status, error.code, error.title, error.detail, headers=error.headers()
    )


def _http_code(status: int) -> str:
    if status == 404:
        return "NOT_FOUND"
    if status == 405:
        return "METHOD_NOT_ALLOWED"
    if status == 413:
        return "INVALID_REQUEST"
    return "INVALID_REQUEST" if status < 500 else "FAIL_COUPON_ISSUE_REQUEST"


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into problem+json and log one line per request."""
    started = time.perf_counter()
    # The caller's id is echoed and logged, so it is bounded once, here.
    request_id = (request.headers.get("X-Request-ID") or "")[:128] or (
        f"{_prefix}-{next(_request_ids):x}"
    )
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
            exc.status, _http_code(exc.status), exc.reason, exc.text or exc.reason, headers=allow
        )
    except Exception:
        log.exception("unhandled_error", request_id=request_id, path=request.path)
        response = problem_response(
            500,
            "FAIL_COUPON_ISSUE_REQUEST",
            "Internal error",
            "An unexpected error occurred; it has been logged.",
        )
    response.headers["X-Request-ID"] = request_id
    elapsed = time.perf_counter() - started
    route = _route_name(request)
    _latency(route, response.status).observe(elapsed)
    log.info(
        "http_request",
        request_id=request_id,
        method=request.method,
        route=route,
        status=response.status,
        duration_ms=round(elapsed * 1000, 3),
    )
    return response


@functools.cache
def _latency(route: str, status: int) -> Histogram:
    """The latency series of a route and status class (a bounded set: routes x classes);
    looked up once, as ``labels()`` costs more than the observation itself."""
    return metrics.HTTP_REQUEST_SECONDS.labels(route, f"{status // 100}xx")


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return "unmatched" if resource is None else resource.canonical


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")
