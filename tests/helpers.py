"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from shared.ops.audit import Actor
from shared.settings import Settings
from stream_worker.worker import Worker
from tests.servers import REPO, free_port, http_ok

ADMIN = {"Authorization": "Bearer test-admin-token-0123456789"}
# Several gateway processes run the way the image runs them: supervisord with this file.
SUPERVISED_GATEWAYS = REPO / "deploy" / "supervisord" / "gateway.conf"
VENV_BIN = Path(sys.executable).parent
PROBLEM_FIELDS = {"type", "title", "status", "detail", "code"}

TEST_ACTOR = Actor("tests", "couponctl")
"""Who the audit log records for changes the tests make through the operations directly."""


async def drain(redis: Redis, pool: aiomysql.Pool, settings: Settings, **changes: Any) -> None:
    """Run a worker in burst mode until nothing is left to do."""
    await Worker(redis, pool, settings.replace(**changes) if changes else settings).run(burst=True)


async def wait_for(
    condition: Callable[[], Awaitable[bool]], *, within: float = 10.0, interval: float = 0.02
) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


async def answers_ok(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether ``url`` answers 200 now (a server still starting answers nothing): a condition
    for :func:`wait_for`."""
    try:
        async with session.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def issue(
    client: TestClient[Any, Any], coupon_id: int, user_id: int
) -> tuple[int, dict[str, Any]]:
    response = await client.post(f"/v1/coupons/{coupon_id}/issues", json={"user_id": user_id})
    return response.status, await response.json(content_type=None)


async def row_count(pool: aiomysql.Pool, coupon_id: int | None = None) -> int:
    """Rows of one coupon, or of all."""
    where, args = ("WHERE coupon_id = %s", (coupon_id,)) if coupon_id else ("", ())
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT COUNT(*) FROM coupon_issues {where}", args)
        (count,) = await cur.fetchone()
        await conn.rollback()
    return int(count)


async def issued_quantity(pool: aiomysql.Pool, coupon_id: int) -> int:
    """The ``coupons.issued_quantity`` column of a coupon."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT issued_quantity FROM coupons WHERE id = %s", (coupon_id,))
        (quantity,) = await cur.fetchone()
        await conn.rollback()
    return int(quantity)


async def couponctl(
    settings: Settings, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run ``couponctl`` in a child process configured only through the environment."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    child_env.update(settings.to_env())
    child_env.update(env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.ops.cli", *args,
        cwd=REPO, env=child_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment for a child process configured by ``settings`` alone; this virtualenv's
    commands first on the PATH (supervisord starts ``coupon-gateway`` by name)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("COUPON_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", os.defpath)])
    env.update(settings.to_env())
    env.update(extra)
    return env


def gateway_command(processes: int, pidfile: Path) -> list[str]:
    """How to start ``processes`` gateway processes on one port: ``python -m gateway`` for one,
    supervisord with the shipped configuration for more (writing its pid to ``pidfile``).
    The environment must hold COUPON_GATEWAY_PROCESSES and, for more than one,
    PROMETHEUS_MULTIPROC_DIR."""
    if processes == 1:
        return [sys.executable, "-m", "gateway"]
    return [
        str(VENV_BIN / "supervisord"),
        "--configuration", str(SUPERVISED_GATEWAYS),
        "--pidfile", str(pidfile),
    ]  # fmt: skip


async def assert_problem(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert an RFC 9457 problem response with the given status (and code); return its body."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/problem+json", response.content_type
    body: dict[str, Any] = await response.json(content_type=None)
    assert body.keys() >= PROBLEM_FIELDS, body
    assert body["status"] == status
    assert isinstance(body["detail"], str)
    assert body["detail"]
    if code is not None:
        assert body["code"] == code, body
    return body


class GatewayProcess:
    """``python -m gateway`` as a child process on a free port, its output in a file; stopped
    with SIGTERM (SIGKILL after a grace period) even when the test fails."""

    def __init__(self, settings: Settings, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = child_env(settings, COUPON_HTTP_PORT=str(self.port), **env)
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> GatewayProcess:
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "gateway"], env=self._env, cwd=REPO,
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            self._wait_healthy(within=30.0)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def _wait_healthy(self, *, within: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + within
        while True:
            if self._process.poll() is not None:
                raise AssertionError(f"gateway exited at start:\n{self.output()}")
            if http_ok(f"{self.url}/healthz"):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"gateway not healthy within {within} s:\n{self.output()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)

    def output(self) -> str:
        return self._log_path.read_text(errors="replace")
