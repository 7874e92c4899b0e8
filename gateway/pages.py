"""The browser pages: the try-it page (public) and the operator console's files (admin).

They are plain HTML, CSS and a little JavaScript, shipped as package data (``gateway/pages/``)
and read once at import: no build step, no framework, nothing fetched from another origin, so
they work offline. Every page answer carries a Content-Security-Policy that allows scripts,
styles and connections from this origin alone, and no framing.

The try-it page is the same file for every coupon (its script reads the id from the address);
the route checks the id and that the coupon exists, so a mistyped address answers 400/404 like
the API. In jwt mode the page asks for a bearer token instead of a user id (the ``data-auth``
attribute it is served with says which).
"""

from __future__ import annotations

import importlib.resources

from aiohttp import web
from redis.exceptions import RedisError

from gateway import appkeys
from shared.errors import CouponNotFound, Unavailable
from shared.ids import parse_id

_FILES = importlib.resources.files("gateway").joinpath("pages")
_TYPES = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on the
    # console's own form posts, which the sign-in refuses.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
"""Headers of every page and page file (``no-cache``: a browser revalidates, so a new version
of the gateway is picked up at the next load)."""


def read(name: str) -> bytes:
    """A page file's bytes, from the package."""
    return _FILES.joinpath(name).read_bytes()


def page_response(body: bytes, name: str, status: int = 200) -> web.Response:
    """``body`` as the file ``name`` (its type by extension), with :data:`PAGE_HEADERS`."""
    content_type = _TYPES[name[name.rindex(".") :]]
    return web.Response(
        body=body, status=status, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS
    )


class Files:
    """A fixed set of page files served by name from memory: a name outside the set is 404, so
    no path from a request ever reaches the file system."""

    def __init__(self, *names: str) -> None:
        self._bodies = {name: read(name) for name in names}

    async def serve(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = self._bodies.get(name)
        if body is None:
            raise web.HTTPNotFound(text=f"no page file {name!r}")
        return page_response(body, name)


public_files = Files("pages.css", "try.js")
_TRY_PAGE = read("try.html")
_TRY_PAGES = {
    mode: _TRY_PAGE.replace(b'data-auth="none"', f'data-auth="{mode}"'.encode())
    for mode in ("none", "jwt")
}

routes = web.RouteTableDef()


@routes.get("/try/{coupon_id}")
async def try_page(request: web.Request) -> web.Response:
    """The try-it page of one coupon: its live state, and a button that requests it."""
    request.app[appkeys.LIMITS].check_reader(request)
    coupon_id = parse_id(request.match_info["coupon_id"], "coupon_id")
    try:
        coupon = await request.app[appkeys.SNAPSHOTS].get(coupon_id)
    except (RedisError, OSError):
        raise Unavailable("Redis is unreachable") from None
    if coupon is None:
        raise CouponNotFound(f"coupon {coupon_id} does not exist")
    return page_response(_TRY_PAGES[request.app[appkeys.SETTINGS].auth], "try.html")


routes.get("/pages/{name}")(public_files.serve)
