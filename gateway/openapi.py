"""The OpenAPI 3.1 description of every gateway route, served at ``GET /openapi.json``.

The document is data: ``gateway/openapi.json``, shipped as package data and edited by hand
together with the validators it describes. ``tests/test_openapi.py`` checks it against the code
(the routes both apps register, the error classes' codes, statuses and headers, the id, amount
and title limits, the coupon type) and real responses against it.

One member is filled in here: ``info.version``, the installed package's version (the file says
``0.0.0``, which is also what is served when the package is not installed). Nothing else
depends on the settings: the admin routes are always listed (their tag says where they are
served with ``COUPON_ADMIN_PORT``) and there is no ``servers`` list. The file is read and
serialised once, at import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
from typing import Any

import orjson
from aiohttp import web

JSON = "application/json"
# The version in the file: a placeholder, replaced by the installed package's version.
PLACEHOLDER_VERSION = "0.0.0"


def _version() -> str:
    try:
        return importlib.metadata.version("coupon-drop")
    except importlib.metadata.PackageNotFoundError:
        return PLACEHOLDER_VERSION


def load() -> dict[str, Any]:
    """The document as the file says it, ``info.version`` left as the placeholder."""
    raw = importlib.resources.files("gateway").joinpath("openapi.json").read_bytes()
    document: dict[str, Any] = orjson.loads(raw)
    return document


DOCUMENT: dict[str, Any] = load()
DOCUMENT["info"]["version"] = _version()

_BODY = orjson.dumps(DOCUMENT)


async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI document, serialised once at import."""
    return web.Response(body=_BODY, content_type=JSON)
