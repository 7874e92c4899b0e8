"""Metrics, logs and dashboards: what an operator sees during a drop is true.

Gateways and workers run here as real child processes (``python -m gateway``,
``python -m stream_worker``), configured only through the environment, as in production.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from shared import keys
from shared.metrics import ISSUE_OUTCOMES
from shared.redis.scripts import IssueResult, Scripts
from shared.settings import Settings
from stream_worker.monitor import OTHER, StreamMonitor
from tests.conftest import CouponFactory
from tests.helpers import (
    REPO,
    answers_ok,
    child_env,
    drain,
    free_port,
    gateway_command,
    issue,
    wait_for,
)
from tests.invariants import Checker

DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"

# PromQL words that look like metric names but are not.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}  # fmt: skip


@contextmanager
def _children(argvs: list[list[str]], env: dict[str, str], logs: list[Path]) -> Iterator[None]:
    """Start processes with stdout+stderr in files (not a terminal); always stop them."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for argv, log in zip(argvs, logs, strict=True):
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
                )
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _outcome_counts(text: str) -> dict[str, int]:
    samples = _samples(text)
    return {
        outcome: int(samples.get(("coupon_issue_requests_total", (("outcome", outcome),)), 0))
        for outcome in ISSUE_OUTCOMES
    }


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a log written to a file; each one must be a JSON object."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


# -- several gateway processes, one set of totals ----------------------------------------------

_NATIVE_CODES = {
    "DUPLICATED_COUPON_ISSUE": "duplicate",
    "INVALID_COUPON_ISSUE_QUANTITY": "sold_out",
    "COUPON_NOT_EXIST": "not_found",
    "INVALID_REQUEST": "invalid",
}


async def test_two_gateway_processes_scrape_as_the_totals_clients_saw(
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
    make_coupon: CouponFactory,
    check_invariants: Checker,
    tmp_path: Path,
) -> None:
    coupon = await make_coupon(total=40)
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    gateway_settings = settings.replace(
        http_port=port, gateway_processes=2, log_format="auto", log_level="info",
        request_log_sample=1.0,
    )
    env = child_env(gateway_settings, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    log = tmp_path / "gateway.log"  # supervisord passes both processes' output on here
    base = f"http://127.0.0.1:{port}"
    argv = gateway_command(2, tmp_path / "supervisord.pid")
    seen: Counter[str] = Counter()
    accepted: set[int] = set()
    refused: set[int] = set()
    request_ids: list[str] = []
    with _children([argv], env, [log]):
        # A new connection per request, so the kernel spreads them over both processes.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            # Both processes must be listening before the counted requests: until each has
            # answered a /readyz (its pid seen in the log), the kernel may hand one of them all.
            async def both_serve() -> bool:
                await answers_ok(session, f"{base}/readyz")
                served = {r["pid"] for r in _json_lines(log) if r.get("event") == "http_request"}
                return len(served) == 2

            await wait_for(both_serve, within=30, interval=0.05)

            async def send(path: str, body: Any, user: int | None) -> None:
                request_id = f"obs-{len(request_ids)}"
                request_ids.append(request_id)
                async with session.post(
                    f"{base}{path}", json=body, headers={"X-Request-ID": request_id}
                ) as response:
                    answer = await response.json(content_type=None)
                    assert response.headers["X-Request-ID"] == request_id
                if response.status == 202:
                    outcome = "accepted"
                    assert user is not None
                    accepted.add(user)
                else:
                    outcome = _NATIVE_CODES[answer["code"]]
                    if user is not None and user not in accepted:
                        refused.add(user)
                seen[outcome] += 1

            issues = f"/v1/coupons/{coupon.id}/issues"
            for user in range(1, 11):
                await send(issues, {"user_id": user}, user)
            for user in range(1, 4):  # asked again before the stock runs out
                await send(issues, {"user_id": user}, user)
            for user in range(11, 61):  # 30 more fit, then sold out
                await send(issues, {"user_id": user}, user)
            for _ in range(3):
                await send(f"/v1/coupons/{coupon.id + 1000}/issues", {"user_id": 5}, None)
            for body in ({"user_id": "x"}, {}, {"user": 1}, [1]):
                await send(issues, body, None)
            scrapes = []
            for _ in range(4):
                async with session.get(f"{base}/metrics") as response:
                    assert response.status == 200
                    scrapes.append(await response.text())

    assert seen == Counter(accepted=40, duplicate=3, sold_out=20, not_found=3, invalid=4)
    expected = {outcome: seen.get(outcome, 0) for outcome in ISSUE_OUTCOMES}
    for text in scrapes:
        # Whichever process answered the scrape, it reports both processes' totals.
        assert _outcome_counts(text) == expected
        samples = _samples(text)
        issue_route = (
            ("route", "/v1/coupons/{coupon_id}/issues"),
            ("status", "2xx"),
        )
        assert samples[("coupon_http_request_duration_seconds_count", issue_route)] == 40

    # One JSON line per request (the aiohttp access log is off), with the caller's request id,
    # and both processes served some of them.
    served_by: dict[int, list[str]] = {}
    for record in _json_lines(log):
        if record.get("event") != "http_request":
            continue
        assert {"route", "status", "duration_ms", "method", "timestamp"} <= set(record)
        if str(record.get("request_id", "")).startswith("obs-"):
            served_by.setdefault(record["pid"], []).append(record["request_id"])
    assert len(served_by) == 2, "reuse_port sent every request to one process"
    assert sorted(rid for rids in served_by.values() for rid in rids) == sorted(request_ids)

    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted=accepted, rejected=refused)


# -- the stream monitor ------------------------------------------------------------------------


def _gauge(name: str, coupon: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"coupon": coupon})


async def _redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_stream_monitor_reports_lag_pending_age_and_remaining_stock(
    settings: Settings,
    client: TestClient[Any, Any],
    redis: Redis,
    pool: aiomysql.Pool,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    coupon = await make_coupon(total=10)
    users = list(range(1, 7))
    for user in users:
        status, _ = await issue(client, coupon.id, user)
        assert status == 202
    monitor = StreamMonitor(redis, interval=1.0)
    label = str(coupon.id)
    k = keys.CouponKeys(coupon.id)

    before = await _redis_ms(redis)
    (state,) = [s for s in await monitor.collect() if s.coupon_id == coupon.id]
    after = await _redis_ms(redis)
    first_ms = int((await redis.xrange(k.requests, count=1))[0][0].split("-")[0])
    assert (state.lag, state.pending, state.remaining) == (6, 0, 4)
    assert (before - first_ms) / 1000 <= state.oldest_age_seconds <= (after - first_ms) / 1000
    assert _gauge("coupon_stream_lag", label) == 6
    assert _gauge("coupon_stream_pending", label) == 0
    assert _gauge("coupon_remaining", label) == 4

    # A worker takes four entries and has not committed them yet.
    await redis.xreadgroup(keys.GROUP, settings.worker_name, {k.requests: ">"}, count=4)
    (state,) = [s for s in await monitor.collect() if s.coupon_id == coupon.id]
    assert (state.lag, state.pending) == (2, 4)
    assert _gauge("coupon_stream_pending", label) == 4
    assert state.oldest_age_seconds >= (before - first_ms) / 1000

    # The worker (same consumer name) settles its own pending entries, then the rest.
    await drain(redis, pool, settings)
    (state,) = [s for s in await monitor.collect() if s.coupon_id == coupon.id]
    assert (state.lag, state.pending, state.oldest_age_seconds, state.remaining) == (0, 0, 0, 4)
    assert _gauge("coupon_stream_oldest_pending_age_seconds", label) == 0
    # Redis's memory against its limit, as INFO reports them (the memory alert's two sides).
    memory = await redis.info("memory")
    assert REGISTRY.get_sample_value("coupon_redis_maxmemory_bytes") == memory["maxmemory"]
    used = REGISTRY.get_sample_value("coupon_redis_used_memory_bytes")
    assert used is not None
    assert 0 < used <= memory["used_memory_peak"]
    await check_invariants(coupon, accepted=users)


async def test_stream_monitor_labels_only_the_busiest_coupons(
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    quiet, busy = await make_coupon(total=5), await make_coupon(total=5)
    unlimited = await make_coupon(total=None)
    scripts = Scripts(redis)
    accepted = {quiet.id: [1, 2], busy.id: [1, 2, 3], unlimited.id: [7]}
    for coupon_id, users in accepted.items():
        outcome = await scripts.reserve(coupon_id, users)
        assert all(r.result is IssueResult.ACCEPTED for r in outcome.reservations)

    states = await StreamMonitor(redis, interval=1.0, max_series=1).collect()
    assert {s.coupon_id: s.lag for s in states} == {quiet.id: 2, busy.id: 3, unlimited.id: 1}
    assert {s.coupon_id: s.remaining for s in states}[unlimited.id] is None
    # Only the coupon with the biggest backlog keeps its own series; the rest are summed.
    assert _gauge("coupon_stream_lag", str(busy.id)) == 3
    assert _gauge("coupon_stream_lag", OTHER) == 3
    assert _gauge("coupon_stream_lag", str(quiet.id)) is None
    assert _gauge("coupon_remaining", str(unlimited.id)) is None

    await drain(redis, pool, settings)
    for coupon in (quiet, busy, unlimited):
        await check_invariants(coupon, accepted=accepted[coupon.id])


# -- dashboards name only what is exported -----------------------------------------------------


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and labels removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", text):
        word, call = match.group(1), match.group(2)
        if call is None and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def test_metric_names_are_read_out_of_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(coupon_x_bucket{route=~"/a|b"}[1m])))'
        " / on (job) max without (instance) (other_metric) > bool 0"
    )
    assert metric_names(expr) == {"coupon_x_bucket", "other_metric"}


def _dashboard_queries() -> list[str]:
    queries = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            queries.extend(target["expr"] for target in panel.get("targets", []))
    queries.extend(re.findall(r"^\s*expr:\s*(.+)$", ALERTS.read_text(), flags=re.M))
    return queries


async def test_every_metric_a_dashboard_or_alert_names_is_exported(
    settings: Settings,
    client: TestClient[Any, Any],
    redis: Redis,
    pool: aiomysql.Pool,
    make_coupon: CouponFactory,
    check_invariants: Checker,
    tmp_path: Path,
) -> None:
    queried = set().union(*(metric_names(q) for q in _dashboard_queries()))
    assert len(queried) >= 10, queried

    coupon = await make_coupon(total=5)
    status, _ = await issue(client, coupon.id, 1)
    assert status == 202
    gateway = await client.get("/metrics")
    exported = {name for name, _ in _samples(await gateway.text())}

    metrics_port = free_port()
    worker_settings = settings.replace(worker_metrics_port=metrics_port, worker_name="obs-worker")
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with _children(
        [[sys.executable, "-m", "stream_worker"]],
        child_env(worker_settings),
        [tmp_path / "worker.log"],
    ):
        async with aiohttp.ClientSession() as session:

            async def monitored() -> bool:
                # The monitor has measured and the worker has committed the request.
                try:
                    async with session.get(url) as response:
                        text = await response.text()
                except aiohttp.ClientError:
                    return False
                samples = _samples(text)
                committed = (("result", "committed"),)
                return ("coupon_stream_lag", (("coupon", str(coupon.id)),)) in samples and (
                    samples.get(("coupon_worker_entries_total", committed), 0) >= 1
                )

            await wait_for(monitored, within=30, interval=0.1)
            async with session.get(url) as response:
                exported |= {name for name, _ in _samples(await response.text())}

    missing = queried - exported
    assert not missing, f"dashboards or alerts query metrics nobody exports: {sorted(missing)}"
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted=[1])


# -- worker logs -------------------------------------------------------------------------------


async def test_worker_logs_one_json_line_per_batch_not_per_entry(
    settings: Settings,
    redis: Redis,
    pool: aiomysql.Pool,
    make_coupon: CouponFactory,
    check_invariants: Checker,
    tmp_path: Path,
) -> None:
    coupon = await make_coupon(total=300)
    users = list(range(1, 251))
    outcome = await Scripts(redis).reserve(coupon.id, users)
    assert all(r.result is IssueResult.ACCEPTED for r in outcome.reservations)

    log = tmp_path / "worker.log"
    env = child_env(
        settings.replace(log_format="auto", log_level="info", batch_size=100, worker_name="w-log")
    )
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stream_worker", "--burst",
            cwd=REPO, env=env, stdout=out, stderr=out,
        )  # fmt: skip
        try:
            assert await asyncio.wait_for(proc.wait(), 60) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    records = _json_lines(log)  # every line JSON: stderr is a file, not a terminal
    batches = [r for r in records if r["event"] == "batch_committed"]
    assert [b["inserted"] for b in batches] == [100, 100, 50]
    assert len(records) < 15, [r["event"] for r in records]
    await check_invariants(coupon, accepted=users)
