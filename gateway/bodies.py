"""Reading a request body: bounded in size and time, and a JSON object or a 400."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from gateway import appkeys
from shared.errors import BodyTimeout, InvalidRequest


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
