"""Schemathesis fuzzes a real gateway process against its own ``/openapi.json``.

The gateway runs as ``python -m gateway`` (the production entry point, uvloop and all) on the
session's Redis and MariaDB. For every documented operation, Hypothesis draws requests that fit
the document (positive) and requests that break it (negative), a bounded number of each. Half
of the drawn coupon ids are swapped for coupons that exist (open, sold out, ended, not started;
the fuzzed PATCHes pause some), so the fuzz reaches the reservation and not only the 404. Every
answer must be no 5xx and match the document: a documented status, content type and headers,
and a body valid against the schema; invalid paths and bodies must be refused with a 4xx.
Afterwards a worker drains and the invariants hold for every coupon, with every 202 (or
``isSuccess: true``) the fuzz got counted as accepted.

Two passes: ``COUPON_AUTH=none`` with the rate limits on (loose enough to rarely trigger), and
``COUPON_AUTH=jwt`` with a valid token for one user, so 401/403 answers are checked too.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis
import jwt
import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shared.coupon_requests import NewCoupon
from shared.model import Coupon
from shared.mysql import coupon_rows
from shared.mysql.pool import create_pool
from shared.ops import coupons
from shared.redis import client as redis_client
from shared.settings import Settings
from stream_worker.worker import Worker
from tests.conftest import ADMIN_TOKEN
from tests.helpers import TEST_ACTOR
from tests.invariants import Checker
from tests.test_security import AUDIENCE, ISSUER, SECRET, GatewayProcess

# Per operation and generation mode: 14 operations (schemathesis leaves out the document's own
# route, which tests/test_openapi.py covers), 10 of them with a negative mode, 2 passes.
MAX_EXAMPLES = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
JWT_USER = 4242


async def _reset_and_make_coupons(settings: Settings) -> list[Coupon]:
    """Empty stores, then coupons in every interesting state."""
    redis = redis_client.connect(settings.redis_url, socket_timeout=5.0)
    pool = await create_pool(settings.mysql, maxsize=2)
    try:
        await redis.flushall()
        async with pool.acquire() as conn, conn.cursor() as cur:
            for table in ("coupon_issues", "coupon_issue_dead_letters", "coupons"):
                await cur.execute(f"DELETE FROM {table}")
            await conn.commit()
        now = datetime.now(UTC)
        hour = timedelta(hours=1)
        shapes = [
            ("open, unlimited", None, now - hour, now + hour),
            ("open, plenty", 1000, now - hour, now + hour),
            ("sold out", 0, now - hour, now + hour),
            ("ended", 10, now - 2 * hour, now - hour),
            ("not started", 10, now + hour, now + 2 * hour),
        ]
        made = []
        for title, total, start, end in shapes:
            new = NewCoupon(title, total, 1000, 10000, start, end)
            made.append(await coupons.create_coupon(pool, redis, new, actor=TEST_ACTOR))
        return made
    finally:
        pool.close()
        await pool.wait_closed()
        await redis.aclose()


async def _drain_and_check(
    settings: Settings, made: list[Coupon], accepted: set[tuple[int, int]]
) -> None:
    redis = redis_client.connect(settings.redis_url, socket_timeout=5.0)
    pool = await create_pool(settings.mysql, maxsize=2)
    try:
        await Worker(redis, pool, settings).run(burst=True)
        check = Checker(pool, redis)
        for coupon in made:
            # Coupons the fuzz may have changed (PATCH) are re-read: I1 is about the final total.
            current = await coupon_rows.fetch_coupon(pool, coupon.id)
            assert current is not None
            users = [user for cid, user in accepted if cid == coupon.id]
            if current.retired:  # the fuzz retired a finished coupon: its Redis sets are gone
                await check.retired(current, None, accepted=users)
            else:
                await check(current, accepted=users)
    finally:
        pool.close()
        await pool.wait_closed()
        await redis.aclose()


def _note_acceptance(
    case: Any, response: Any, accepted: set[tuple[int, int]], user: int | None
) -> None:
    """Remember (coupon, user) for every 202 / isSuccess true, for the invariants afterwards."""
    if response.status_code == 202:
        body = response.json()
        accepted.add((int(body["coupon_id"]), int(body["user_id"])))
    elif (
        response.status_code == 200
        and case.path.startswith(("/v1/issue", "/v2/issue"))
        and response.json().get("isSuccess") is True
    ):
        sent = case.body
        accepted.add((int(sent["couponId"]), int(user if user is not None else sent["userId"])))


def checks_for(case: Any, *, jwt_mode: bool) -> list[Any]:
    """Invalid data in the path or the body must be refused with a 4xx. Not so for the query
    and headers: unknown query parameters are ignored (as HTTP APIs do), and the headers this
    test sends (the bearer token) replace the generated ones. Nor for a body without its user
    in jwt mode: the document's schemas say it may be left out then (the token names the user)."""
    meta = case.meta
    if meta is None:
        return CHECKS
    issue_route = case.path.endswith("/issues") or case.path.startswith(("/v1/issue", "/v2/"))
    user_left_out = (
        jwt_mode
        and issue_route
        and isinstance(case.body, dict)
        and not {"user_id", "userId"} & case.body.keys()
    )
    if meta.is_negative_at(ParameterLocation.PATH) or (
        meta.is_negative_at(ParameterLocation.BODY) and not user_left_out
    ):
        return [*CHECKS, negative_data_rejection]
    return CHECKS


def fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    target: Target,
    accepted: set[tuple[int, int]],
) -> None:
    """``MAX_EXAMPLES`` requests of one operation in one generation mode, each checked."""

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def one(case: Any, data: st.DataObject) -> None:
        parameters = case.path_parameters or {}
        # A path drawn to be invalid stays so: a real coupon's id would make the request valid,
        # and the check that invalid data is refused would then judge a valid one.
        invalid_path = case.meta is not None and case.meta.is_negative_at(ParameterLocation.PATH)
        if (
            "coupon_id" in parameters
            and not invalid_path
            and data.draw(st.booleans(), label="real coupon")
        ):
            parameters["coupon_id"] = data.draw(st.sampled_from(target.coupon_ids))
        if target.jwt_user is not None and data.draw(st.booleans(), label="token's user"):
            # Act for the token's user half the time, so jwt mode reaches the reservation too.
            if "user_id" in parameters:
                parameters["user_id"] = target.jwt_user
            if isinstance(case.body, dict):
                for field in ("user_id", "userId"):
                    if field in case.body:
                        case.body[field] = target.jwt_user
        response = case.call(base_url=target.base_url, headers=target.headers, timeout=15)
        checks = checks_for(case, jwt_mode=target.jwt_user is not None)
        case.validate_response(response, checks=checks, headers=target.headers)
        _note_acceptance(case, response, accepted, target.jwt_user)

    one()


@dataclass(frozen=True)
class Target:
    base_url: str
    coupon_ids: list[int]
    headers: dict[str, str]
    jwt_user: int | None


def fuzz(target: Target) -> set[tuple[int, int]]:
    """Every operation, positive then negative; the (coupon, user) pairs that were accepted."""
    schema = schemathesis.openapi.from_url(f"{target.base_url}/openapi.json", timeout=10)
    # The live feed never ends: judge its stream by the first event (the snapshot), not by all
    # it sends until the request timeout.
    schema.config.max_stream_events = 1
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14, [operation.label for operation in operations]
    accepted: set[tuple[int, int]] = set()
    for operation in operations:
        fuzz_operation(operation, GenerationMode.POSITIVE, target, accepted)
        # Only a path, query or body can be made invalid; a route whose only input is the
        # free-form X-Request-ID header has no negative case.
        if operation.path_parameters or operation.query or operation.body:
            fuzz_operation(operation, GenerationMode.NEGATIVE, target, accepted)
    return accepted


@pytest.mark.parametrize("auth", ["none", "jwt"])
def test_gateway_answers_every_fuzzed_request_as_documented(
    settings: Settings, tmp_path: Path, auth: str
) -> None:
    started = time.monotonic()
    made = asyncio.run(_reset_and_make_coupons(settings))
    env = {
        "COUPON_LOG_LEVEL": "warning",
        # On, but loose: a real limit in the path, 429s documented, the fuzz rarely stopped.
        "COUPON_RATE_LIMIT_IP_PER_SECOND": "1000",
        "COUPON_RATE_LIMIT_USER_PER_SECOND": "1000",
    }
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    jwt_user = None
    if auth == "jwt":
        env |= {
            "COUPON_AUTH": "jwt",
            "COUPON_JWT_SECRET": SECRET,
            "COUPON_JWT_AUDIENCE": AUDIENCE,
            "COUPON_JWT_ISSUER": ISSUER,
        }
        jwt_user = JWT_USER
        claims = {
            "sub": str(JWT_USER),
            "aud": AUDIENCE,
            "iss": ISSUER,
            "exp": int(time.time()) + 600,
        }
        # One header for every operation: the admin routes then see a user token (401).
        headers = {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}
    with GatewayProcess(settings, tmp_path / "gateway.log", **env) as gateway:
        try:
            target = Target(gateway.url, [coupon.id for coupon in made], headers, jwt_user)
            accepted = fuzz(target)
        except BaseException:
            print(gateway.output()[-4000:])
            raise
        assert "Traceback" not in gateway.output(), gateway.output()[-4000:]
    asyncio.run(_drain_and_check(settings, made, accepted))
    # Bounded: the whole pass stays well inside the CI budget.
    print(f"fuzz pass {auth}: {time.monotonic() - started:.1f} s, {len(accepted)} accepted")
