"""Secrets stay out of the log, and the admin routes answer 503 (never 500), while a store is down.

A regression test for a security finding: with MariaDB stopped, ``GET /admin/coupons/1`` answered
500 and the gateway's JSON log held the MySQL service password, because every traceback was
rendered with each frame's local variables (the driver's connect frame holds the password).

On real processes (a private MariaDB, a private Redis, one gateway in jwt mode logging JSON at
debug level) this test proves:

- with MariaDB stopped, every admin route (list, show, create, patch) answers 503
  ``application/problem+json`` with ``Retry-After``, and no request ever answers 500;
- with MariaDB back and Redis stopped, the admin routes that need Redis (show, create, patch)
  and a public issue request with a valid token answer 503 problem+json with ``Retry-After``;
  the list, which reads MySQL alone, still answers 200; again nothing answers 500;
- afterwards the gateway's log holds none of the admin token, the MySQL password, the JWT
  secret or the user's token, and it did go through the outage path (``store_unavailable``
  events, no ``unhandled_error``, no logged 500).
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import jwt
import orjson

from tests.fault.harness import wait_until

OUTAGE_WITHIN = 15.0
"""How long a route may take to notice a store is down (or back) and answer accordingly."""


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Answers:
    """Calls the gateway and keeps every status seen, so a single 500 anywhere fails the test."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url
        self.seen: list[tuple[str, str, int]] = []

    async def call(
        self, method: str, path: str, *, headers: dict[str, str], body: Any = None
    ) -> tuple[int, str, dict[str, str], Any]:
        async with self.session.request(
            method,
            self.base_url + path,
            headers=headers,
            json=body,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as response:
            raw = await response.read()
            status, content_type = response.status, response.content_type
            answer_headers = dict(response.headers)
        self.seen.append((method, path, status))
        assert status != 500, f"{method} {path} answered 500: {raw[:500]!r}"
        decoded = orjson.loads(raw) if raw else None
        return status, content_type, answer_headers, decoded

    async def wait_for_503(
        self, method: str, path: str, *, headers: dict[str, str], body: Any = None
    ) -> None:
        """Wait (bounded) until the route answers 503 problem+json with Retry-After."""
        last: list[Any] = []

        async def unavailable() -> bool:
            status, content_type, answer_headers, problem = await self.call(
                method, path, headers=headers, body=body
            )
            last[:] = [status, content_type, problem]
            if status != 503:
                return False
            assert content_type == "application/problem+json", (method, path, content_type)
            assert answer_headers.get("Retry-After", "").isdigit(), (method, path, answer_headers)
            assert problem["status"] == 503, problem
            assert problem["code"] == "FAIL_COUPON_ISSUE_REQUEST", problem
            return True

        try:
            await wait_until(
                unavailable, within=OUTAGE_WITHIN, interval=0.1, what=f"{method} {path}"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer: {last}") from None


async def test_admin_routes_answer_503_and_leak_no_secret_while_a_store_is_down(stacks):
    jwt_secret = "fault-jwt-secret-" + secrets.token_urlsafe(32)
    assert len(jwt_secret.encode()) >= 32
    stack = await stacks(private_mysql=True)
    mysql, redis = stack.mysql_server, stack.redis_server
    assert mysql is not None
    admin_token = stack.settings.admin_token
    mysql_password = stack.settings.mysql.password
    assert admin_token
    assert len(admin_token) >= 16
    assert mysql_password
    assert len(mysql_password) >= 8
    gateway = await stack.start_gateway(
        log_format="json", log_level="debug", auth="jwt", jwt_secret=jwt_secret
    )
    now = datetime.now(UTC)
    coupon = await stack.create_coupon(
        100, start=now - timedelta(minutes=1), end=now + timedelta(hours=1)
    )
    user_token = jwt.encode(
        {"sub": "42", "exp": int(time.time()) + 300}, jwt_secret, algorithm="HS256"
    )
    admin = _bearer(admin_token)
    new_coupon = {
        "title": "created during an outage",
        "total_quantity": 10,
        "date_issue_start": (now - timedelta(minutes=1)).isoformat(),
        "date_issue_end": (now + timedelta(hours=1)).isoformat(),
    }
    admin_calls: list[tuple[str, str, Any]] = [
        ("GET", "/admin/coupons", None),
        ("GET", f"/admin/coupons/{coupon.id}", None),
        ("POST", "/admin/coupons", new_coupon),
        ("PATCH", f"/admin/coupons/{coupon.id}", {"title": "renamed during an outage"}),
    ]

    async with aiohttp.ClientSession() as session:
        answers = Answers(session, gateway.url)
        # Healthy first: the token and the bodies are valid, so a 503 later is the outage's.
        status, _, _, page = await answers.call("GET", "/admin/coupons", headers=admin)
        assert status == 200, page
        assert [c["id"] for c in page["coupons"]] == [coupon.id], page

        # MariaDB down: every admin route needs MySQL.
        await mysql.terminate()
        for method, path, body in admin_calls:
            await answers.wait_for_503(method, path, headers=admin, body=body)

        # MariaDB back (wait until the gateway's pool serves again), then Redis down.
        await mysql.start()

        async def mysql_serves() -> bool:
            status, *_ = await answers.call("GET", "/admin/coupons", headers=admin)
            return status == 200

        await wait_until(mysql_serves, within=OUTAGE_WITHIN, interval=0.1, what="MySQL back")
        await redis.terminate()
        for method, path, body in admin_calls[1:]:
            await answers.wait_for_503(method, path, headers=admin, body=body)
        await answers.wait_for_503(
            "POST", f"/v1/coupons/{coupon.id}/issues", headers=_bearer(user_token), body={}
        )
        # The list reads MySQL alone: it keeps working while Redis is down.
        status, _, _, page = await answers.call("GET", "/admin/coupons", headers=admin)
        assert status == 200, page
        assert [c["id"] for c in page["coupons"]] == [coupon.id], page

    # Stopped, so every line is in the file; Redis comes back for the fixture's teardown.
    await gateway.terminate()
    await redis.start()
    log = gateway.log_path.read_text(errors="replace")
    assert "gateway_starting" in log, log[-2000:]
    for name, secret in (
        ("admin token", admin_token),
        ("MySQL password", mysql_password),
        ("JWT secret", jwt_secret),
        ("user token", user_token),
    ):
        at = log.find(secret)
        assert at < 0, f"the {name} reached the gateway log:\n{log[max(0, at - 1500) : at + 200]}"
    assert gateway.events("store_unavailable"), f"no store_unavailable event:\n{log[-3000:]}"
    assert not gateway.events("unhandled_error"), log[-3000:]
    logged = [e["status"] for e in gateway.events("http_request")]
    assert 503 in logged, logged
    assert 500 not in logged, logged
    assert all(status != 500 for *_, status in answers.seen), answers.seen
