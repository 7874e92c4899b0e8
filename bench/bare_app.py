"""The benchmarks' yardstick: a bare aiohttp JSON endpoint on uvloop, nothing else.

``POST /issue`` parses a JSON body and answers a small JSON object, the least any issue route
must do. ``python -m bench.bare_app PORT [BACKLOG]``: it listens with the gateway's default
backlog (4096) unless told otherwise, and with ``SO_REUSEPORT``, so the burst benchmark can
start several copies on one port as it does gateway processes.
"""

from __future__ import annotations

import sys

import orjson
import uvloop
from aiohttp import web


async def issue(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    return web.Response(
        body=orjson.dumps({"user_id": body.get("user_id"), "status": "accepted"}),
        status=202,
        content_type="application/json",
    )


def main() -> None:
    app = web.Application()
    app.router.add_post("/issue", issue)
    app.router.add_get("/readyz", ready)
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        backlog=int(sys.argv[2]) if len(sys.argv) > 2 else 4096,
        reuse_port=True,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


async def ready(request: web.Request) -> web.Response:
    return web.Response(text="ok")


if __name__ == "__main__":
    main()
