"""Security of the gateway, on the real app over real Redis and MariaDB.

Covers verified identity (``COUPON_AUTH=jwt``): every forged identity (no token, ``alg: none``,
a wrong key, an expired token, a wrong audience or issuer, a ``sub`` that is no user id, a body
user id that is not the token's) gets 401/403 problem+json on the native and the seed routes
and reserves nothing; RS256/ES256 with a public key; a user token on the admin routes is 401;
the admin routes on their own listener (``COUPON_ADMIN_PORT``); the rate limits (bursts get 429
with Retry-After and reserve nothing; ``X-Forwarded-For`` only counts from trusted proxies);
input limits (no Redis key from unvalidated input); bad security settings fail at start in one
line; and secrets never reach the logs of the gateway, the worker or couponctl.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
import jwt
import orjson
import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from redis.asyncio import Redis

from gateway.app import create_app
from gateway.ratelimit import RateLimiter
from shared import keys
from shared.ids import MAX_ID
from shared.model import Coupon
from shared.mysql import coupon_rows
from shared.settings import ConfigError, Settings
from tests.conftest import ADMIN_TOKEN, MYSQL_PASSWORD, CouponFactory
from tests.helpers import ADMIN, REPO, GatewayProcess, assert_problem, child_env, couponctl, drain
from tests.invariants import Checker

Client = TestClient[Any, Any]
ClientFactory = Callable[..., Awaitable[Client]]

SECRET = "jwt-test-secret-0123456789-abcdefghij"  # 37 bytes, over the 32-byte minimum
AUDIENCE = "coupon-drop-tests"
ISSUER = "https://id.example.test"
NATIVE = "native"
SEED_ROUTES = ("/v1/issue", "/v1/issue-async", "/v2/issue-async")
ROUTES = (NATIVE, *SEED_ROUTES)


# --------------------------------------------------------------------------------------------
# helpers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(sub: Any = "42", *, exp_in: int | None = 300, **extra: Any) -> dict[str, Any]:
    """Valid claims for the test audience and issuer; ``None`` values are left out."""
    payload: dict[str, Any] = {"sub": sub, "aud": AUDIENCE, "iss": ISSUER}
    if exp_in is not None:
        payload["exp"] = int(time.time()) + exp_in
    payload.update(extra)
    return {name: value for name, value in payload.items() if value is not None}


def token(sub: Any = "42", *, key: Any = SECRET, algorithm: str = "HS256", **kw: Any) -> str:
    return jwt.encode(claims(sub, **kw), key, algorithm=algorithm)


def hand_made(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token PyJWT would refuse to make: ``alg: none``, or HS256 keyed with a public key."""
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(payload))}"
    if hmac_key is None:
        return signing_input + "."
    digest = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(digest)}"


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def post_issue(
    client: Client,
    route: str,
    coupon_id: int,
    user_id: int | None,
    headers: dict[str, str] | None = None,
) -> aiohttp.ClientResponse:
    """One issue request on the native route or a seed route (user id left out when None)."""
    if route == NATIVE:
        body: dict[str, Any] = {} if user_id is None else {"user_id": user_id}
        return await client.post(f"/v1/coupons/{coupon_id}/issues", json=body, headers=headers)
    body = {"couponId": coupon_id} | ({} if user_id is None else {"userId": user_id})
    return await client.post(route, json=body, headers=headers)


async def accepted(response: aiohttp.ClientResponse) -> bool:
    """202 on the native route, ``isSuccess: true`` on a seed route."""
    body = await response.json(content_type=None)
    if response.status == 202:
        return True
    return response.status == 200 and body.get("isSuccess") is True


async def assert_nothing_reserved(redis: Redis, *coupons: Coupon) -> None:
    for coupon in coupons:
        k = keys.CouponKeys(coupon.id)
        assert await redis.xlen(k.requests) == 0, "a stream entry was written"
        assert await redis.scard(k.users) == 0, "a stock slot was taken"


@pytest.fixture
def jwt_settings(settings: Settings) -> Settings:
    return settings.replace(auth="jwt", jwt_secret=SECRET, jwt_audience=AUDIENCE, jwt_issuer=ISSUER)


@pytest.fixture
async def jwt_client(
    aiohttp_client: ClientFactory, jwt_settings: Settings, redis: Redis, pool: aiomysql.Pool
) -> Client:
    return await aiohttp_client(create_app(jwt_settings))


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


# --------------------------------------------------------------------------------------------
# 1. verified identity


def _forged() -> list[tuple[str, dict[str, str], str | None]]:
    """(case, headers, RFC 6750 error) for every way a presented identity must fail."""
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return [
        ("no_token", {}, None),
        ("basic_scheme", {"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ("empty_bearer", {"Authorization": "Bearer "}, None),
        ("garbage", bearer("not.a.jwt"), "invalid_token"),
        ("alg_none", bearer(hand_made({"alg": "none", "typ": "JWT"}, claims(), None)),
         "invalid_token"),
        ("alg_none_with_signature",
         bearer(hand_made({"alg": "none"}, claims(), None) + "c2ln"), "invalid_token"),
        ("wrong_key", bearer(token(key="another-secret-0123456789-abcdefghijk")),
         "invalid_token"),
        ("hs512_same_secret", bearer(_hs512_same_secret()), "invalid_token"),
        ("rs256_own_key", bearer(token(key=other_rsa, algorithm="RS256")), "invalid_token"),
        ("expired", bearer(token(exp_in=-60)), "invalid_token"),
        ("no_exp", bearer(token(exp_in=None)), "invalid_token"),
        ("not_yet_valid", bearer(token(nbf=int(time.time()) + 600)), "invalid_token"),
        ("wrong_audience", bearer(token(aud="someone-else")), "invalid_token"),
        ("no_audience", bearer(token(aud=None)), "invalid_token"),
        ("wrong_issuer", bearer(token(iss="https://evil.example")), "invalid_token"),
        ("no_sub", bearer(token(sub=None)), "invalid_token"),
        ("sub_not_a_number", bearer(token(sub="alice")), "invalid_token"),
        ("sub_as_json_number", bearer(token(sub=42)), "invalid_token"),
        ("sub_zero", bearer(token(sub="0")), "invalid_token"),
        ("sub_leading_zero", bearer(token(sub="042")), "invalid_token"),
        ("sub_negative", bearer(token(sub="-42")), "invalid_token"),
        ("sub_too_big", bearer(token(sub=str(MAX_ID + 1))), "invalid_token"),
        ("tampered_sub", bearer(_tampered()), "invalid_token"),
    ]  # fmt: skip


def _hs512_same_secret() -> str:
    with warnings.catch_warnings():
        # PyJWT warns that the secret is short for SHA-512; this token is forged on purpose.
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return token(algorithm="HS512")


def _tampered() -> str:
    """A valid token for user 42 whose payload was swapped for user 43's, signature kept."""
    header, _, signature = token("42").split(".")
    return ".".join((header, b64url(orjson.dumps(claims("43"))), signature))


FORGED = _forged()


@pytest.mark.parametrize(("case", "headers", "error"), FORGED, ids=[case for case, _, _ in FORGED])
async def test_forged_identity_is_401_on_every_issue_route_and_reserves_nothing(
    jwt_client: Client,
    redis: Redis,
    make_coupon: CouponFactory,
    case: str,
    headers: dict[str, str],
    error: str | None,
) -> None:
    coupon = await make_coupon(total=10)
    for route in ROUTES:
        # The body names the user the token claims (42), so only the token itself is at fault.
        response = await post_issue(jwt_client, route, coupon.id, 42, headers)
        await assert_problem(response, 401, "UNAUTHORIZED")
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="coupon-drop"'), challenge
        if error is None:
            assert "error=" not in challenge, challenge
        else:
            assert f'error="{error}"' in challenge, challenge
    await assert_nothing_reserved(redis, coupon)


@pytest.mark.parametrize("route", ROUTES)
async def test_body_user_other_than_token_subject_is_403_and_reserves_nothing(
    jwt_client: Client, redis: Redis, make_coupon: CouponFactory, route: str
) -> None:
    coupon = await make_coupon(total=10)
    response = await post_issue(jwt_client, route, coupon.id, 43, bearer(token("42")))
    await assert_problem(response, 403, "FORBIDDEN")
    await assert_nothing_reserved(redis, coupon)


async def test_valid_token_issues_for_its_subject_with_or_without_body_user(
    jwt_client: Client,
    redis: Redis,
    pool: aiomysql.Pool,
    jwt_settings: Settings,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=10)
    winners = []
    for number, route in enumerate(ROUTES):
        user = 100 + number
        named = await post_issue(jwt_client, route, coupon.id, user, bearer(token(str(user))))
        assert await accepted(named), await named.text()
        winners.append(user)
    native = await post_issue(jwt_client, NATIVE, coupon.id, None, bearer(token("200")))
    assert native.status == 202
    assert (await native.json())["user_id"] == 200
    seed = await post_issue(jwt_client, "/v2/issue-async", coupon.id, None, bearer(token("201")))
    assert await accepted(seed)
    winners += [200, 201]
    # The same subject again is a duplicate, however the body names it.
    again = await post_issue(jwt_client, NATIVE, coupon.id, None, bearer(token("200")))
    await assert_problem(again, 409, "DUPLICATED_COUPON_ISSUE")
    assert await redis.scard(keys.CouponKeys(coupon.id).users) == len(winners)
    await drain(redis, pool, jwt_settings)
    await check_invariants(coupon, accepted=winners)


async def test_malformed_body_user_with_valid_token_is_400_not_403(
    jwt_client: Client, redis: Redis, make_coupon: CouponFactory
) -> None:
    coupon = await make_coupon(total=10)
    for bad in ("42", 42.0, True, 0, -1, MAX_ID + 1, [42]):
        response = await jwt_client.post(
            f"/v1/coupons/{coupon.id}/issues", json={"user_id": bad}, headers=bearer(token())
        )
        await assert_problem(response, 400, "INVALID_REQUEST")
    await assert_nothing_reserved(redis, coupon)


async def test_status_route_answers_only_the_users_own_token(
    jwt_client: Client, make_coupon: CouponFactory
) -> None:
    coupon = await make_coupon(total=10)
    assert (await post_issue(jwt_client, NATIVE, coupon.id, 42, bearer(token("42")))).status == 202
    path = f"/v1/coupons/{coupon.id}/issues/42"
    own = await jwt_client.get(path, headers=bearer(token("42")))
    assert own.status == 200
    assert (await own.json())["status"] == "pending"
    await assert_problem(await jwt_client.get(path, headers=bearer(token("43"))), 403, "FORBIDDEN")
    await assert_problem(await jwt_client.get(path), 401, "UNAUTHORIZED")
    expired = await jwt_client.get(path, headers=bearer(token("42", exp_in=-60)))
    await assert_problem(expired, 401, "UNAUTHORIZED")


async def test_user_token_on_admin_routes_is_401_and_changes_nothing(
    jwt_client: Client, pool: aiomysql.Pool, make_coupon: CouponFactory
) -> None:
    coupon = await make_coupon(total=10)
    # A perfectly valid user token, and one signed with the admin token as its HMAC secret.
    for user_token in (token("42"), token("42", key=ADMIN_TOKEN + "-padding-to-32-bytes!")):
        headers = bearer(user_token)
        attempts = [
            jwt_client.post("/admin/coupons", json={"title": "x"}, headers=headers),
            jwt_client.get("/admin/coupons", headers=headers),
            jwt_client.get(f"/admin/coupons/{coupon.id}", headers=headers),
            jwt_client.patch(
                f"/admin/coupons/{coupon.id}", json={"total_quantity": 0}, headers=headers
            ),
        ]
        for attempt in attempts:
            response = await attempt
            await assert_problem(response, 401, "UNAUTHORIZED")
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT COUNT(*), MAX(total_quantity) FROM coupons")
        assert await cur.fetchone() == (1, 10)
        await conn.rollback()
    # The admin token still works in jwt mode.
    assert (await jwt_client.get(f"/admin/coupons/{coupon.id}", headers=ADMIN)).status == 200


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
@pytest.mark.parametrize("given_as", ["pem_text", "pem_file"])
async def test_asymmetric_tokens_verify_with_the_configured_public_key_only(
    aiohttp_client: ClientFactory,
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
    make_coupon: CouponFactory,
    check_invariants: Checker,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    tmp_path: Path,
    algorithm: str,
    given_as: str,
) -> None:
    signing_key: Any = rsa_key if algorithm == "RS256" else ec_key
    pem = public_pem(signing_key)
    if given_as == "pem_file":
        path = tmp_path / "jwt-public.pem"
        path.write_text(pem)
        configured = str(path)
    else:
        configured = pem
    app_settings = settings.replace(
        auth="jwt", jwt_algorithm=algorithm, jwt_public_key=configured, jwt_audience=AUDIENCE
    )
    client = await aiohttp_client(create_app(app_settings))
    coupon = await make_coupon(total=10)
    impostor: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    forged = [
        token("7", key=impostor, algorithm=algorithm),
        # Key confusion: HS256 keyed with the public key the server holds.
        hand_made({"alg": "HS256", "typ": "JWT"}, claims("7"), pem.encode()),
        token("7", key=SECRET, algorithm="HS256"),
        hand_made({"alg": "none"}, claims("7"), None),
    ]
    for forged_token in forged:
        response = await post_issue(client, NATIVE, coupon.id, None, bearer(forged_token))
        await assert_problem(response, 401, "UNAUTHORIZED")
    await assert_nothing_reserved(redis, coupon)
    good = await post_issue(
        client, NATIVE, coupon.id, 7, bearer(token("7", key=signing_key, algorithm=algorithm))
    )
    assert good.status == 202, await good.text()
    await drain(redis, pool, app_settings)
    await check_invariants(coupon, accepted=[7])


BAD_SECURITY_ENV: list[tuple[dict[str, str], str]] = [
    ({"COUPON_AUTH": "oauth"}, "COUPON_AUTH"),
    ({"COUPON_AUTH": "jwt"}, "COUPON_JWT_SECRET"),
    ({"COUPON_AUTH": "jwt", "COUPON_JWT_SECRET": "too-short"}, "COUPON_JWT_SECRET"),
    ({"COUPON_AUTH": "jwt", "COUPON_JWT_ALGORITHM": "RS256"}, "COUPON_JWT_PUBLIC_KEY"),
    ({"COUPON_AUTH": "jwt", "COUPON_JWT_ALGORITHM": "none"}, "COUPON_JWT_ALGORITHM"),
    ({"COUPON_AUTH": "jwt", "COUPON_JWT_ALGORITHM": "HS384"}, "COUPON_JWT_ALGORITHM"),
    (
        {"COUPON_AUTH": "jwt", "COUPON_JWT_ALGORITHM": "ES256",
         "COUPON_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"},
        "COUPON_JWT_PUBLIC_KEY",
    ),
    (
        {"COUPON_AUTH": "jwt", "COUPON_JWT_ALGORITHM": "ES256",
         "COUPON_JWT_PUBLIC_KEY": "/nonexistent/key.pem"},
        "COUPON_JWT_PUBLIC_KEY",
    ),
    ({"COUPON_JWT_LEEWAY_SECONDS": "-1"}, "COUPON_JWT_LEEWAY_SECONDS"),
    ({"COUPON_ADMIN_PORT": "70000"}, "COUPON_ADMIN_PORT"),
    ({"COUPON_ADMIN_PORT": "8080"}, "COUPON_ADMIN_PORT"),
    ({"COUPON_RATE_LIMIT_IP_PER_SECOND": "-5"}, "COUPON_RATE_LIMIT_IP_PER_SECOND"),
    ({"COUPON_RATE_LIMIT_USER_PER_SECOND": "nan"}, "COUPON_RATE_LIMIT_USER_PER_SECOND"),
    ({"COUPON_RATE_LIMIT_IP_BURST": "-1"}, "COUPON_RATE_LIMIT_IP_BURST"),
    ({"COUPON_RATE_LIMIT_MAX_KEYS": "0"}, "COUPON_RATE_LIMIT_MAX_KEYS"),
    ({"COUPON_TRUSTED_PROXIES": "10.0.0.0/33"}, "COUPON_TRUSTED_PROXIES"),
    ({"COUPON_TRUSTED_PROXIES": "10.0.0.1/8"}, "COUPON_TRUSTED_PROXIES"),
    ({"COUPON_TRUSTED_PROXIES": "proxy.internal"}, "COUPON_TRUSTED_PROXIES"),
]  # fmt: skip


@pytest.mark.parametrize(("env", "variable"), BAD_SECURITY_ENV)
def test_bad_security_setting_is_refused_naming_the_variable(
    env: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError, match=variable) as refused:
        Settings.from_env(env)
    assert "\n" not in str(refused.value)


def test_rsa_key_for_es256_and_a_short_rsa_key_are_refused(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (the point)
    wrong = [
        ("ES256", public_pem(rsa_key)),
        ("RS256", public_pem(ec_key)),
        ("RS256", public_pem(short)),
    ]
    for algorithm, pem in wrong:
        env = {
            "COUPON_AUTH": "jwt",
            "COUPON_JWT_ALGORITHM": algorithm,
            "COUPON_JWT_PUBLIC_KEY": pem,
        }
        with pytest.raises(ConfigError, match="COUPON_JWT_PUBLIC_KEY"):
            Settings.from_env(env)
    env = {
        "COUPON_AUTH": "jwt",
        "COUPON_JWT_SECRET": SECRET,
        "COUPON_JWT_PUBLIC_KEY": public_pem(ec_key),
    }
    with pytest.raises(ConfigError, match="COUPON_JWT_PUBLIC_KEY"):
        Settings.from_env(env)  # HS256 with a public key configured is ambiguous


def test_gateway_in_jwt_mode_without_a_key_exits_at_start_with_one_line(
    settings: Settings,
) -> None:
    env = child_env(settings, COUPON_AUTH="jwt")
    done = subprocess.run(
        [sys.executable, "-m", "gateway"], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "COUPON_JWT_SECRET" in lines[0]


# --------------------------------------------------------------------------------------------
# 2. the admin listener


async def test_admin_port_serves_admin_routes_and_the_public_port_none(
    aiohttp_client: ClientFactory,
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
    check_invariants: Checker,
) -> None:
    admin_port = free_port()
    public = await aiohttp_client(create_app(settings.replace(admin_port=admin_port)))
    body = {
        "title": "behind the admin port",
        "total_quantity": 2,
        "date_issue_start": "2000-01-01T00:00:00+00:00",
        "date_issue_end": "2999-01-01T00:00:00+00:00",
    }
    await assert_problem(
        await public.post("/admin/coupons", json=body, headers=ADMIN), 404, "NOT_FOUND"
    )
    await assert_problem(await public.get("/admin/coupons", headers=ADMIN), 404, "NOT_FOUND")
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT COUNT(*) FROM coupons")
        assert await cur.fetchone() == (0,)
        await conn.rollback()
    base = f"http://127.0.0.1:{admin_port}"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/admin/coupons", json=body) as response:
            await assert_problem(response, 401, "UNAUTHORIZED")
        async with session.post(f"{base}/admin/coupons", json=body, headers=ADMIN) as response:
            assert response.status == 201, await response.text()
            coupon_id = (await response.json())["id"]
        async with session.get(f"{base}/admin/coupons/{coupon_id}", headers=ADMIN) as response:
            assert response.status == 200
        # The admin listener serves nothing else.
        async with session.post(f"{base}/v1/coupons/{coupon_id}/issues", json={"user_id": 1}) as r:
            assert r.status == 404
    # Created through the admin listener, issuable at once on the public one.
    assert (await public.post(f"/v1/coupons/{coupon_id}/issues", json={"user_id": 1})).status == 202
    await drain(redis, pool, settings)
    coupon = await coupon_rows.fetch_coupon(pool, coupon_id)
    assert coupon is not None
    await check_invariants(coupon, accepted=[1])


# --------------------------------------------------------------------------------------------
# 3. rate limits


async def limited_client(
    aiohttp_client: ClientFactory, settings: Settings, **limits: Any
) -> Client:
    return await aiohttp_client(create_app(settings.replace(**limits)))


async def test_address_burst_beyond_the_limit_is_429_with_retry_after_and_reserves_nothing(
    aiohttp_client: ClientFactory,
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    # One request per 100 s sustained: nothing refills while the test runs.
    client = await limited_client(
        aiohttp_client, settings, rate_limit_ip_per_second=0.01, rate_limit_ip_burst=3
    )
    coupon = await make_coupon(total=100)
    statuses = []
    for user in range(1, 7):
        response = await post_issue(client, NATIVE, coupon.id, user)
        statuses.append(response.status)
        if response.status == 429:
            await assert_problem(response, 429, "RATE_LIMITED")
            retry_after = int(response.headers["Retry-After"])
            assert 1 <= retry_after <= 100
    assert statuses == [202, 202, 202, 429, 429, 429]
    for route in SEED_ROUTES:
        await assert_problem(await post_issue(client, route, coupon.id, 50), 429, "RATE_LIMITED")
    k = keys.CouponKeys(coupon.id)
    assert await redis.xlen(k.requests) == 3
    assert await redis.scard(k.users) == 3
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted=[1, 2, 3], rejected=[4, 5, 6, 50])
    metrics_text = await (await client.get("/metrics")).text()
    assert 'coupon_issue_requests_total{outcome="rate_limited"}' in metrics_text


async def test_user_burst_beyond_the_limit_is_429_on_any_coupon_and_route(
    aiohttp_client: ClientFactory,
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    client = await limited_client(
        aiohttp_client, settings, rate_limit_user_per_second=0.01, rate_limit_user_burst=2
    )
    first, second, third = [await make_coupon(total=10) for _ in range(3)]
    assert (await post_issue(client, NATIVE, first.id, 7)).status == 202
    assert await accepted(await post_issue(client, "/v2/issue-async", second.id, 7))
    limited = await post_issue(client, NATIVE, third.id, 7)
    await assert_problem(limited, 429, "RATE_LIMITED")
    assert int(limited.headers["Retry-After"]) >= 1
    await assert_problem(await post_issue(client, "/v1/issue", third.id, 7), 429, "RATE_LIMITED")
    await assert_nothing_reserved(redis, third)
    # The limit is per user: another user is served.
    assert (await post_issue(client, NATIVE, third.id, 8)).status == 202
    await drain(redis, pool, settings)
    await check_invariants(first, accepted=[7])
    await check_invariants(second, accepted=[7])
    await check_invariants(third, accepted=[8], rejected=[7])


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis, make_coupon: CouponFactory
) -> None:
    client = await limited_client(
        aiohttp_client,
        settings,
        rate_limit_ip_per_second=0.01,
        rate_limit_ip_burst=2,
        trusted_proxies="10.0.0.0/8",  # the test client (127.0.0.1) is not a trusted proxy
    )
    coupon = await make_coupon(total=100)
    spoofed = ["198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4"]
    statuses = []
    for user, address in enumerate(spoofed, start=1):
        response = await client.post(
            f"/v1/coupons/{coupon.id}/issues",
            json={"user_id": user},
            headers={"X-Forwarded-For": address},
        )
        statuses.append(response.status)
    assert statuses == [202, 202, 429, 429]
    assert await redis.scard(keys.CouponKeys(coupon.id).users) == 2


async def test_forwarded_for_from_a_trusted_proxy_names_the_client(
    aiohttp_client: ClientFactory, settings: Settings, redis: Redis, make_coupon: CouponFactory
) -> None:
    client = await limited_client(
        aiohttp_client,
        settings,
        rate_limit_ip_per_second=0.01,
        rate_limit_ip_burst=1,
        trusted_proxies="127.0.0.0/8, 10.0.0.0/8",
    )
    coupon = await make_coupon(total=100)
    expected = [
        ("203.0.113.1", 202),
        ("203.0.113.2", 202),
        ("203.0.113.1", 429),  # same client again
        # A client-injected entry on the left is not believed: the rightmost untrusted is.
        ("6.6.6.6, 203.0.113.2", 429),
        # Trusted hops on the right are skipped.
        ("203.0.113.3, 10.1.2.3", 202),
        ("203.0.113.3", 429),
        # IPv6 clients share a bucket per /64.
        ("2001:db8:1:2::1", 202),
        ("2001:db8:1:2::ffff", 429),
        ("2001:db8:1:3::1", 202),
        # Unreadable: the client cannot be named, so the trusted peer itself is the key.
        ("not-an-address", 202),
        ("also, garbage", 429),
    ]
    for user, (forwarded, status) in enumerate(expected, start=1):
        response = await client.post(
            f"/v1/coupons/{coupon.id}/issues",
            json={"user_id": user},
            headers={"X-Forwarded-For": forwarded},
        )
        assert response.status == status, (forwarded, await response.text())
    assert await redis.scard(keys.CouponKeys(coupon.id).users) == sum(
        1 for _, status in expected if status == 202
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_allows_the_burst_then_the_rate_and_refusals_cost_nothing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2.0, 3, max_keys=10, clock=clock)
    assert [limiter.hit("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.hit("a")
    assert wait == pytest.approx(0.5)
    # Hammering while refused does not push the next allowed moment further away.
    for _ in range(100):
        assert limiter.hit("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.hit("a") == 0.0
    assert limiter.hit("a") == pytest.approx(0.5)
    # Another key is independent; a long pause refills the burst, never beyond it.
    assert limiter.hit("b") == 0.0
    clock.now += 3600
    assert [limiter.hit("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert limiter.hit("a") > 0


def test_limiter_burst_zero_means_one_seconds_worth() -> None:
    clock = FakeClock()
    assert RateLimiter(5.0, 0, max_keys=10, clock=clock).burst == 5
    assert RateLimiter(0.2, 0, max_keys=10, clock=clock).burst == 1


def test_limiter_memory_is_bounded_and_idle_keys_are_dropped() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 1, max_keys=100, clock=clock)
    for address in range(1000):
        limiter.hit(address)
    assert len(limiter) == 100  # the least recently used were dropped
    # Every one of those buckets refills within a second; new keys sweep the idle ones out.
    clock.now += 5
    for address in range(1000, 1060):
        limiter.hit(address)
    # Each new key swept two idle ones until none was left: 100 - 2*50 + 50, then 10 more.
    assert len(limiter) == 60
    # A key that was dropped gets a fresh bucket, exactly like a new one.
    assert limiter.hit(0) == 0.0


# --------------------------------------------------------------------------------------------
# 4. input limits


HOSTILE_SEGMENTS = [
    "*",
    "1*",
    "{coupon:1}",
    "1:meta",
    "%7Bcoupon%3A1%7D",
    "1%00",
    "1 ",
    " 1",
    "x" * 300,
]


async def test_no_redis_key_is_built_from_unvalidated_input(
    client: Client, redis: Redis, make_coupon: CouponFactory
) -> None:
    coupon = await make_coupon(total=5)
    before = {str(key) for key in await redis.keys("*")}
    for segment in HOSTILE_SEGMENTS:
        requests = [
            client.post(f"/v1/coupons/{segment}/issues", json={"user_id": 1}),
            client.get(f"/v1/coupons/{segment}"),
            client.get(f"/v1/coupons/{segment}/issues/1"),
            client.get(f"/v1/coupons/{coupon.id}/issues/{segment}"),
            client.get(f"/admin/coupons/{segment}", headers=ADMIN),
            client.patch(f"/admin/coupons/{segment}", json={"paused": True}, headers=ADMIN),
            client.post(f"/v1/coupons/{coupon.id}/issues", json={"user_id": segment}),
            client.post("/v2/issue-async", json={"couponId": segment, "userId": 1}),
            client.post("/v1/issue", json={"couponId": coupon.id, "userId": segment}),
        ]
        for request in requests:
            response = await request
            assert 400 <= response.status < 500, (segment, response.status)
    assert {str(key) for key in await redis.keys("*")} == before
    await assert_nothing_reserved(redis, coupon)


async def test_admin_query_limits_are_checked(client: Client) -> None:
    for query in (
        "after=-1",
        "after=abc",
        f"after={MAX_ID + 1}",
        "limit=0",
        "limit=1001",
        "limit=1e3",
    ):
        response = await client.get(f"/admin/coupons?{query}", headers=ADMIN)
        await assert_problem(response, 400, "INVALID_REQUEST")


async def test_body_limit_applies_to_the_seed_and_admin_routes_too(
    client: Client, redis: Redis, settings: Settings, make_coupon: CouponFactory
) -> None:
    coupon = await make_coupon(total=5)
    padding = "x" * (settings.max_body_bytes + 1)
    assert settings.max_body_bytes <= 64 * 1024  # far below aiohttp's 1 MiB default
    seed = await client.post(
        "/v2/issue-async", json={"couponId": coupon.id, "userId": 1, "p": padding}
    )
    assert seed.status == 413
    admin = await client.post("/admin/coupons", json={"title": padding}, headers=ADMIN)
    assert admin.status == 413
    await assert_nothing_reserved(redis, coupon)


# --------------------------------------------------------------------------------------------
# 5. secrets stay out of the logs


async def test_secrets_never_reach_the_logs(
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
    tmp_path: Path,
) -> None:
    user_token = token("42")
    debug = {"COUPON_LOG_LEVEL": "debug", "COUPON_LOG_FORMAT": "json"}
    with GatewayProcess(
        settings, tmp_path / "gateway.log", COUPON_AUTH="jwt", COUPON_JWT_SECRET=SECRET,
        COUPON_JWT_AUDIENCE=AUDIENCE, COUPON_JWT_ISSUER=ISSUER, **debug,
    ) as gateway:  # fmt: skip
        async with aiohttp.ClientSession() as session:
            calls = [
                ("GET", "/admin/coupons", ADMIN),
                ("GET", "/admin/coupons", bearer(ADMIN_TOKEN[:-1] + "x")),
                ("POST", "/v1/coupons/1/issues", bearer(user_token)),
                ("POST", "/v1/coupons/1/issues", bearer(token("42", exp_in=-5))),
            ]
            for method, path, headers in calls:
                async with session.request(
                    method, gateway.url + path, json={"user_id": 42}, headers=headers
                ) as response:
                    assert response.status < 500
        gateway.stop()
        logs = [gateway.output()]
    assert "gateway_starting" in logs[0]
    # The worker in burst mode, and couponctl with a wrong MySQL password.
    env = child_env(settings, **debug)
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream_worker", "--burst", cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(worker.communicate(), 60)
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    logs.append(out.decode(errors="replace"))
    wrong_password = "wrong-password-that-must-not-be-printed"
    bad_url = settings.mysql_url.replace(MYSQL_PASSWORD, wrong_password)
    code, out_ctl, err_ctl = await couponctl(
        settings, "coupon", "list", env={"COUPON_MYSQL_URL": bad_url}
    )
    assert code != 0
    logs.append(out_ctl + err_ctl)
    for text in logs:
        for secret in (ADMIN_TOKEN, SECRET, MYSQL_PASSWORD, wrong_password, user_token):
            assert secret not in text, f"a secret reached the logs:\n{text[:2000]}"
