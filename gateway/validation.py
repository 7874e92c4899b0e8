"""Parsing of ids and bodies. Everything here raises :class:`InvalidRequest` (a 400), so no
Redis key is ever built from unvalidated input."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from gateway import appkeys
from shared.coupons import MAX_ID
from shared.errors import BodyTimeout, InvalidRequest


def parse_id(raw: str, name: str) -> int:
    """A positive 64-bit id from a path segment: plain decimal digits, 1 .. 2^63-1."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise InvalidRequest(f"{name} must be an integer between 1 and {MAX_ID}")
    value = int(raw)
    if not 1 <= value <= MAX_ID:
        raise InvalidRequest(f"{name} must be an integer between 1 and {MAX_ID}")
    return value


def id_field(body: dict[str, Any], name: str) -> int:
    """A positive 64-bit id from a JSON body (booleans and floats are refused)."""
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise InvalidRequest(f"{name} must be an integer between 1 and {MAX_ID}")
    return value


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; the size limit is the app's ``client_max_size``, the
    time limit ``COUPON_BODY_READ_TIMEOUT_SECONDS`` (a client that sends half a body must not
    hold a connection and a handler for ever)."""
    if request.content.is_eof():  # the usual case: the body came with the headers
        raw = await request.read()
    else:
        try:
            async with asyncio.timeout(request.app[appkeys.SETTINGS].body_read_timeout_seconds):
                raw = await request.read()
        except TimeoutError:
            raise BodyTimeout("the request body did not arrive in time") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body
