"""Locust load test for a coupon drop, counting business outcomes, not only HTTP errors.

Each simulated user sends back-to-back issue requests (no think time, like the seed's test) for
one coupon with a random user id from a configurable range, on the native route or on the
seed-compatible one (a configurable share). Every answer is classified by what it means, from
its status and problem ``code`` (native) or its ``isSuccess``/``comment`` (seed), and reported
under ``<route> <outcome>`` (``native accepted``, ``seed sold_out``, ...): the statistics,
CSV files and charts show outcomes, and an HTTP 200 that says "sold out" is never a success in
disguise. Only answers that are neither a decision nor an expected refusal count as failures:
5xx, resets, timeouts, and anything unexpected.

With ``--accepted-dir DIR`` each locust process appends the users it was told "accepted" (and
those whose answer is unknown) to files there, so ``scripts/loadtest`` can check every one of
them against MySQL.

Options (also as environment variables, for the distributed compose file):
``--coupon-id`` (``LOCUST_COUPON_ID``, default 1), ``--user-id-min`` / ``--user-id-max``
(``LOCUST_USER_ID_MIN`` / ``LOCUST_USER_ID_MAX``, default 1 .. 10,000,000 as the seed),
``--seed-route-share`` (``LOCUST_SEED_ROUTE_SHARE``, 0..1, default 0.5),
``--seed-route`` (``LOCUST_SEED_ROUTE``, default ``/v2/issue-async``; ``/v1/issue`` is the
synchronous one), ``--accepted-dir`` (``LOCUST_ACCEPTED_DIR``), ``--final-stats FILE``
(``LOCUST_FINAL_STATS``: the complete per-outcome counts and percentiles as JSON, at exit).

    locust -f deploy/locust/locustfile.py --host http://127.0.0.1:8080 --coupon-id 1
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from locust import FastHttpUser, events, stats, task
from locust.env import Environment
from locust.runners import WorkerRunner

stats.PERCENTILES_TO_CHART = [0.5, 0.95, 0.99]

# The native route's problem codes, and the seed's comments, mapped to the outcome names the
# gateway's coupon_issue_requests_total{outcome} uses, so the two can be compared.
NATIVE_CODES = {
    "DUPLICATED_COUPON_ISSUE": "duplicate",
    "INVALID_COUPON_ISSUE_QUANTITY": "sold_out",
    "INVALID_COUPON_ISSUE_DATE": "outside_window",
    "COUPON_PAUSED": "paused",
    "COUPON_NOT_EXIST": "not_found",
    "INVALID_REQUEST": "invalid",
    "RATE_LIMITED": "rate_limited",
}
SEED_COMMENTS = {
    "이미 발급된 쿠폰입니다.": "duplicate",
    "쿠폰 발급 수량이 유효하지 않습니다.": "sold_out",
    # The seed has one message for "outside the window" and "paused"; it reads as the former.
    "쿠폰 발급 기간이 유효하지 않습니다.": "outside_window",
    "존재하지 않는 쿠폰입니다.": "not_found",
}
STATUS_OUTCOMES = {400: "invalid", 404: "not_found", 413: "invalid", 429: "rate_limited"}
EXPECTED = {
    "accepted",
    "duplicate",
    "sold_out",
    "outside_window",
    "paused",
    "not_found",
    "invalid",
    "rate_limited",
}
"""Outcomes that are a definite answer; the rest (unavailable, error) are failures."""


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: Any) -> None:
    parser.add_argument("--coupon-id", type=int, env_var="LOCUST_COUPON_ID", default=1)
    parser.add_argument("--user-id-min", type=int, env_var="LOCUST_USER_ID_MIN", default=1)
    parser.add_argument("--user-id-max", type=int, env_var="LOCUST_USER_ID_MAX", default=10_000_000)
    parser.add_argument(
        "--seed-route-share", type=float, env_var="LOCUST_SEED_ROUTE_SHARE", default=0.5
    )
    parser.add_argument(
        "--seed-route", type=str, env_var="LOCUST_SEED_ROUTE", default="/v2/issue-async"
    )
    parser.add_argument("--accepted-dir", type=str, env_var="LOCUST_ACCEPTED_DIR", default="")
    parser.add_argument("--final-stats", type=str, env_var="LOCUST_FINAL_STATS", default="")


class _Journal:
    """Users told accepted, and users whose answer is unknown, appended to this process's
    files in batches (a locust process is one OS process; greenlets share this object)."""

    def __init__(self) -> None:
        self.directory: Path | None = None
        self._buffers: dict[str, list[int]] = {"accepted": [], "unknown": []}

    def note(self, kind: str, user_id: int) -> None:
        if self.directory is None:
            return
        buffer = self._buffers[kind]
        buffer.append(user_id)
        if len(buffer) >= 1000:
            self.flush()

    def flush(self) -> None:
        if self.directory is None:
            return
        for kind, buffer in self._buffers.items():
            if buffer:
                path = self.directory / f"{kind}-{os.getpid()}.txt"
                with path.open("a") as handle:
                    handle.write("".join(f"{user}\n" for user in buffer))
                buffer.clear()


journal = _Journal()


@events.init.add_listener  # type: ignore[untyped-decorator]
def _init(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is not None and options.accepted_dir:
        journal.directory = Path(options.accepted_dir)
        journal.directory.mkdir(parents=True, exist_ok=True)


@events.test_stop.add_listener  # type: ignore[untyped-decorator]
def _test_stop(**_: Any) -> None:
    journal.flush()


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def _quitting(environment: Environment, **_: Any) -> None:
    journal.flush()
    options = environment.parsed_options
    runner = environment.runner
    if options is None or not options.final_stats or runner is None:
        return
    if isinstance(runner, WorkerRunner):
        return
    # Written when every user has stopped: locust's own CSV is refreshed once a second and
    # may miss the last second; this is the complete count.
    entries = [*runner.stats.entries.values(), runner.stats.total]
    final = {
        entry.name: {
            "requests": entry.num_requests,
            "failures": entry.num_failures,
            "p50_ms": entry.get_response_time_percentile(0.5),
            "p95_ms": entry.get_response_time_percentile(0.95),
            "p99_ms": entry.get_response_time_percentile(0.99),
            "max_ms": entry.max_response_time,
            "rps": entry.total_rps,
        }
        for entry in entries
    }
    Path(options.final_stats).write_text(json.dumps(final, indent=2))


def native_outcome(status: int, body: dict[str, Any] | None) -> str:
    if status == 202:
        return "accepted"
    if status == 503:
        return "unavailable"
    code = (body or {}).get("code")
    if isinstance(code, str) and code in NATIVE_CODES:
        return NATIVE_CODES[code]
    return STATUS_OUTCOMES.get(status, "error")


def seed_outcome(status: int, body: dict[str, Any] | None) -> str:
    if status == 200 and body is not None:
        if body.get("isSuccess") is True:
            return "accepted"
        return SEED_COMMENTS.get(str(body.get("comment")), "error")
    return native_outcome(status, body)


class CouponDropUser(FastHttpUser):
    """One client clicking "get my coupon" as fast as the server answers."""

    connection_timeout = 10.0
    network_timeout = 10.0

    @task
    def issue(self) -> None:
        options = self.environment.parsed_options
        coupon_id = options.coupon_id if options else 1
        low = options.user_id_min if options else 1
        high = options.user_id_max if options else 10_000_000
        share = options.seed_route_share if options else 0.5
        user_id = random.randint(low, high)  # noqa: S311 - load, not secrets
        if random.random() < share:  # noqa: S311
            route, classify = "seed", seed_outcome
            path = options.seed_route if options else "/v2/issue-async"
            payload: dict[str, int] = {"userId": user_id, "couponId": coupon_id}
            name = path
        else:
            route, classify = "native", native_outcome
            path = f"/v1/coupons/{coupon_id}/issues"
            payload = {"user_id": user_id}
            name = "/v1/coupons/[id]/issues"
        with self.client.post(path, json=payload, name=name, catch_response=True) as response:
            status = response.status_code or 0
            try:
                body = response.json() if response.content else None
            except ValueError:
                body = None
            outcome = classify(status, body if isinstance(body, dict) else None)
            # Statistics by meaning: one row per route and outcome.
            response.request_meta["name"] = f"{route} {outcome}"
            if outcome == "accepted":
                journal.note("accepted", user_id)
            if outcome in EXPECTED:
                response.success()
            else:
                journal.note("unknown", user_id)
                response.failure(f"{outcome}: HTTP {status}")
