"""The benchmarks' yardstick: a bare aiohttp JSON endpoint on uvloop, nothing else.

``POST /issue`` parses a JSON body and answers a small JSON object, the least any issue route
must do. ``python -m tests.bench.bare_app PORT [BACKLOG] [--uvloop-accept]``: it listens with the
gateway's default backlog (4096) unless told otherwise, and with ``SO_REUSEPORT``, so the
burst benchmark can start several copies on one port as it does gateway processes.

It accepts connections as the gateway does (``gateway.listener``: every queued connection at
each wake-up), so a ratio to it measures what the gateway's request handling costs and nothing
else. ``--uvloop-accept`` uses aiohttp's own site instead, on which uvloop accepts one
connection per loop iteration; in a 5,000-connection burst that leaves hundreds of clients in
the kernel's accept queue for the whole run (the burst table's "never" column shows them).
"""

from __future__ import annotations

import sys

import orjson
import uvloop
from aiohttp import web

from gateway.listener import listening_socket, serve


async def issue(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    return web.Response(
        body=orjson.dumps({"user_id": body.get("user_id"), "status": "accepted"}),
        status=202,
        content_type="application/json",
    )


async def ready(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    port = int(args[0])
    backlog = int(args[1]) if len(args) > 1 else 4096
    app = web.Application()
    app.router.add_post("/issue", issue)
    app.router.add_get("/readyz", ready)
    sock = listening_socket("127.0.0.1", port, backlog=backlog, reuse_port=True)
    if "--uvloop-accept" in sys.argv:
        web.run_app(
            app, sock=sock, backlog=backlog, access_log=None, print=None,
            loop=uvloop.new_event_loop(),
        )  # fmt: skip
    else:
        serve(app, sock, shutdown_timeout=1.0, keepalive_timeout=75.0)


if __name__ == "__main__":
    main()
