"""The rate limiter's cost on the hot path, measured side by side in one run.

``python -m tests.bench.ratelimit_cost [--duration S] [--rounds N] [--quick]``

Three gateways (one process each) run at once on a private stack (:mod:`tests.bench.stack`: its own
Redis and MariaDB, stopped at the end whatever happens) and take the same ``wrk`` load on the
native issue route of an unlimited coupon, every request a new random user:

- ``off``: no limits (``COUPON_RATE_LIMIT_*`` = 0);
- ``on``: both limits on, every request allowed and paying the full check: the address limit
  set too high to bite (wrk is one address), and a realistic user limit (1/s, burst 5), so
  every request creates a user bucket that stays live for a second (thousands of live keys,
  swept as they go idle), as in a drop where every request is a new user;
- ``refusing``: an address limit of 1 request per 1000 s, so nearly everything is a 429:
  the cost of shedding an abusive client.

Rounds run the scenarios back to back, in a rotated order each round. The result that matters
is the ratio ``on / off`` (1.0 = free), reported two ways: the median of the per-round ratios
(each pair measured minutes apart at most, so drift in the machine's load mostly cancels out)
and best round against best round. Absolute numbers depend on the machine. The in-process
cost of one limiter check and of one JWT verification are printed too (``timeit``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import timeit
from dataclasses import asdict
from typing import Any

import aiohttp
import jwt

from gateway.ratelimit import RateLimiter
from tests.bench.run import WrkResult, run_wrk
from tests.bench.stack import Service, Stack, stack

SCENARIOS: dict[str, dict[str, Any]] = {
    "off": {},
    "on": {
        "rate_limit_ip_per_second": 1e9,
        "rate_limit_ip_burst": 1_000_000_000,
        "rate_limit_user_per_second": 1,
        "rate_limit_user_burst": 5,
        "rate_limit_max_keys": 100_000,
    },
    "refusing": {"rate_limit_ip_per_second": 0.001, "rate_limit_ip_burst": 1},
}
EXPECTED = {"off": "202", "on": "202", "refusing": "429"}


def log(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


async def create_unlimited_coupon(service: Service, admin_token: str) -> int:
    body = {
        "title": "ratelimit cost",
        "total_quantity": None,
        "date_issue_start": "2000-01-01T00:00:00+00:00",
        "date_issue_end": "2999-01-01T00:00:00+00:00",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{service.url}/admin/coupons",
            json=body,
            headers={"Authorization": f"Bearer {admin_token}"},
        ) as response,
    ):
        answer = await response.json(content_type=None)
        if response.status != 201:
            raise RuntimeError(f"creating the coupon failed: {response.status} {answer}")
        return int(answer["id"])


def micro() -> dict[str, float]:
    """Nanoseconds per call of the pieces, in this process (no HTTP)."""
    number = 200_000
    limiter = RateLimiter(1e9, 1_000_000_000, max_keys=100_000)
    same = timeit.timeit(lambda: limiter.hit("127.0.0.1"), number=number) / number
    # New keys that stay live (1 per 1000 s): the dict fills to max_keys, then evicts.
    users = RateLimiter(0.001, 5, max_keys=100_000)
    counter = iter(range(10**12))
    fresh = timeit.timeit(lambda: users.hit(next(counter)), number=number) / number
    secret = b"bench-secret-0123456789-0123456789-abcdef"
    token = jwt.encode({"sub": "42", "exp": int(time.time()) + 3600}, secret, algorithm="HS256")
    options: Any = {"require": ["exp", "sub"]}
    decodes = 20_000
    hs256 = (
        timeit.timeit(
            lambda: jwt.decode(token, secret, algorithms=["HS256"], options=options),
            number=decodes,
        )
        / decodes
    )
    return {
        "limiter_same_key_ns": same * 1e9,
        "limiter_new_key_ns": fresh * 1e9,
        "jwt_hs256_verify_ns": hs256 * 1e9,
    }


async def measure(running: Stack, duration: int, rounds: int, connections: int) -> dict[str, Any]:
    services = {
        name: running.start_gateway(name=f"gateway-{name}", **changes)
        for name, changes in SCENARIOS.items()
    }
    coupon_id = await create_unlimited_coupon(services["off"], running.admin_token)
    path = f"/v1/coupons/{coupon_id}/issues"
    body = '{"user_id":%d}'
    best: dict[str, WrkResult] = {}
    paired: dict[str, list[float]] = {"on": [], "refusing": []}
    try:
        names = list(services)
        for round_number in range(1, rounds + 1):
            # Rotate the order every round, so no scenario always runs first or last.
            shift = (round_number - 1) % len(names)
            this_round: dict[str, float] = {}
            for name in names[shift:] + names[:shift]:
                service = services[name]
                run_wrk(running, service.url, path, body, 1, 8)  # warm-up
                result = run_wrk(running, service.url, path, body, duration, connections)
                share = result.statuses.get(EXPECTED[name], 0) / max(result.requests, 1)
                if share < 0.99:
                    raise RuntimeError(f"{name}: expected {EXPECTED[name]}s, got {result.statuses}")
                log(
                    f"round {round_number} {name:9} {result.rps:10,.0f} req/s"
                    f"  p99 {result.p99_ms:6.1f} ms  statuses {result.statuses}"
                )
                if name not in best or result.rps > best[name].rps:
                    best[name] = result
                this_round[name] = result.rps
            for name, ratios in paired.items():
                ratios.append(this_round[name] / this_round["off"])
    finally:
        for service in services.values():
            running.stop(service.procs)
    return {
        "best": {name: asdict(result) for name, result in best.items()},
        "paired_ratios": paired,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    with stack() as running:
        http = await measure(running, args.duration, args.rounds, args.connections)
    best = http["best"]
    results = {
        "http": best,
        "paired_ratios": http["paired_ratios"],
        "on_vs_off_median": statistics.median(http["paired_ratios"]["on"]),
        "on_vs_off_best": best["on"]["rps"] / best["off"]["rps"],
        "refusing_vs_off_median": statistics.median(http["paired_ratios"]["refusing"]),
        "micro": micro(),
        "duration": args.duration,
        "rounds": args.rounds,
        "connections": args.connections,
    }
    results["seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tests.bench.ratelimit_cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; best counts")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--quick", action="store_true", help="1 s, 1 round: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 1, 1
    try:
        results = asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("interrupted; every process the bench started is stopped", file=sys.stderr)
        raise SystemExit(130) from None
    http = results["http"]
    for name in SCENARIOS:
        print(f"{name:9} {http[name]['rps']:10,.0f} req/s  p99 {http[name]['p99_ms']:6.1f} ms")
    rounds = ", ".join(f"{ratio:.3f}" for ratio in results["paired_ratios"]["on"])
    print(f"limiter on / off        {results['on_vs_off_median']:.3f} median of rounds ({rounds})")
    print(f"limiter on / off        {results['on_vs_off_best']:.3f} best vs best")
    print(f"refusing (429) / off    {results['refusing_vs_off_median']:.3f} median of rounds")
    for name, value in results["micro"].items():
        print(f"{name:24}{value:8.0f} ns")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
