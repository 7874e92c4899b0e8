"""The gateway process as a drop meets it: its listen queue is as long as configured (the kernel
caps it at ``net.core.somaxconn``, and the gateway says so at start), and the hot routes log a
sample of their requests while every other route logs each one."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import uvloop
from aiohttp import web

from gateway.listener import EagerAcceptSite, listening_socket
from tests.helpers import REPO, answers_ok, child_env, drain, free_port, wait_for

SOMAXCONN = int(Path("/proc/sys/net/core/somaxconn").read_text())


def _records(log: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in log.read_bytes().splitlines() if line.startswith(b"{")]


def _listen_queue(port: int) -> int:
    """The accept queue size of the socket listening on ``port`` (``ss``: Send-Q)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    sizes = {int(line.split()[2]) for line in out.splitlines() if line.strip()}
    assert len(sizes) == 1, out
    return sizes.pop()


async def test_listen_backlog_is_applied_and_hot_routes_log_a_sample(
    settings, redis, pool, make_coupon, check_invariants, tmp_path
):
    coupon = await make_coupon(total=3)
    port = free_port()
    # One more than the kernel allows: the queue is capped, and the gateway warns about it.
    asked = SOMAXCONN + 1
    env = child_env(
        settings.replace(
            http_port=port,
            log_format="json",
            log_level="info",
            listen_backlog=asked,
            request_log_sample=0.0,
        )
    )
    log = tmp_path / "gateway.log"
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        gateway = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", cwd=REPO, env=env, stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    accepted: set[int] = set()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_for(lambda: answers_ok(session, f"{base}/readyz"), within=30, interval=0.05)
            assert _listen_queue(port) == min(asked, SOMAXCONN)
            issues = f"{base}/v1/coupons/{coupon.id}/issues"
            statuses = []
            for user in range(1, 6):  # three accepted, two sold out
                async with session.post(issues, json={"user_id": user}) as response:
                    statuses.append(response.status)
                    assert response.headers["X-Request-ID"]
                    if response.status == 202:
                        accepted.add(user)
            assert statuses == [202, 202, 202, 409, 409]
            async with session.get(f"{base}/healthz", headers={"X-Request-ID": "h-1"}):
                pass
            # A stray byte in the caller's id: a fresh id, and the request still succeeds.
            async with session.get(f"{base}/healthz", headers={"X-Request-ID": "\xff"}) as r:
                assert r.status == 200
                assert r.headers["X-Request-ID"] != "\xff"
    finally:
        gateway.terminate()
        await asyncio.wait_for(gateway.wait(), 30)
    records = _records(log)
    capped = [r for r in records if r.get("event") == "listen_backlog_capped"]
    assert capped, records[:5]
    assert capped[0]["somaxconn"] == SOMAXCONN
    lines = [r for r in records if r.get("event") == "http_request"]
    routes = [str(r["route"]) for r in lines]
    # At a sample of 0 the issue route logs nothing (no 5xx happened); health checks log each.
    assert "/v1/coupons/{coupon_id}/issues" not in routes, routes
    assert routes.count("/healthz") == 2
    assert {r["request_id"] for r in lines if r["route"] == "/healthz"} >= {"h-1"}
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted=accepted, rejected={4, 5})


def _accept_queue_length(port: int) -> int:
    """Connections the kernel holds for the socket listening on ``port``, not yet accepted
    (``/proc/net/tcp``: a listening socket's rx_queue is its accept queue)."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # 0A: LISTEN
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on {port}")


async def _read_to_end(loop: asyncio.AbstractEventLoop, client: socket.socket) -> bytes:
    chunks = []
    while chunk := await loop.sock_recv(client, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_flood_of_queued_connections_is_accepted_at_the_first_wake_up():
    """The first seconds of a drop, in small: 300 clients connected and sent their request
    before the server looked. uvloop's own accept takes one connection per loop iteration (the
    rest waited seconds in the kernel's queue while the loop served the first ones); the
    gateway's listener takes them all at its first wake-up, so when the first request is
    handled nothing is left in the queue, and every client is answered."""
    clients_count = 300

    async def scenario() -> tuple[list[int], list[bytes]]:
        queue_when_handled: list[int] = []

        async def handler(request: web.Request) -> web.Response:
            queue_when_handled.append(_accept_queue_length(port))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = listening_socket("127.0.0.1", 0, backlog=1024, reuse_port=False)
        port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        # The kernel completes each handshake and queues the connection; nobody accepts yet.
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(clients_count)]
        try:
            for client in clients:
                client.sendall(b"GET / HTTP/1.1\r\nHost: drop\r\nConnection: close\r\n\r\n")
                client.setblocking(False)
            assert _accept_queue_length(port) == clients_count
            await EagerAcceptSite(runner, sock).start()
            answers = await asyncio.wait_for(
                asyncio.gather(*(_read_to_end(loop, client) for client in clients)), timeout=30
            )
        finally:
            for client in clients:
                client.close()
            await runner.cleanup()
        return queue_when_handled, answers

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        queue_when_handled, answers = runner.run(scenario())
    assert len(queue_when_handled) == clients_count
    assert queue_when_handled[0] == 0, queue_when_handled[:10]
    assert all(answer.startswith(b"HTTP/1.1 200 OK") for answer in answers)
