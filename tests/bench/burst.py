"""The drop moment: thousands of clients connect at once, side by side with the bare endpoint.

``wrk`` opens every connection at once (5,000 in the full run), then each connection sends its
next request as soon as it has an answer, for a fixed time; user ids are random in
1..10,000,000 and the coupon holds 10,000, so the first seconds sell the stock and the rest are
"sold out" answers, as in a real drop. The same load runs against the bare aiohttp endpoint with
the same number of processes and the same listen backlog, so the ratios say what the gateway
costs on this machine and nothing else. Two workers run during the gateway's bursts, as in
production, and drain the drop afterwards; then its invariants are checked.

Per run: the rate of answers, p50/p99 latency, the failed requests (timeouts, socket errors,
5xx, and connections never accepted), the kernel's listen-queue overflows during the run
(``TcpExtListenOverflows``, which counts SYNs and connections dropped because an accept queue
was full; it is system-wide, and nothing else on the box opens connections meanwhile), and the
server's accept queue, sampled every 0.2 s: its longest, and what was still in it when the run
ended. A connection still queued then never got an answer in the whole run, and wrk counts it
nowhere (its timeout check does not fire before the end), so it is counted as failed here.
"""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
from redis.asyncio import Redis

from shared.mysql.pool import create_pool
from shared.redis import client as redis_client
from tests.bench import checks
from tests.bench.stack import PYTHON, Proc, Service, Stack
from tests.bench.wrk import WRK_SCRIPT, wrk_json
from tests.servers import find_binary, free_port, http_ok

NETSTAT = Path("/proc/net/netstat")

ROUTES = {
    # name: (path template, body template, what counts as accepted)
    "native": ("/v1/coupons/{coupon}/issues", '{{"user_id":%d}}', "202"),
    "seed": ("/v2/issue-async", '{{"userId":%d,"couponId":{coupon}}}', "success"),
}


@dataclass(frozen=True)
class BurstProfile:
    connections: int
    seconds: int
    stock: int
    rounds: int
    timeout_seconds: int = 10


FULL = BurstProfile(connections=5_000, seconds=10, stock=10_000, rounds=2)
QUICK = BurstProfile(connections=200, seconds=2, stock=100, rounds=1, timeout_seconds=5)


@dataclass
class BurstRun:
    target: str
    route: str
    processes: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    failed: int
    failed_pct: float
    timeouts: int
    socket_errors: int
    status_5xx: int
    listen_overflows: int
    accept_queue_max: int
    never_accepted: int
    statuses: dict[str, int]


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full."""
    lines = NETSTAT.read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(table.get("ListenOverflows", 0))
    return 0


def accept_queue(port: int) -> int:
    """Connections waiting to be accepted on ``port``, summed over its listening sockets
    (several with ``SO_REUSEPORT``): a listening socket's rx_queue in ``/proc/net/tcp``."""
    suffix = f":{port:04X}"
    waiting = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(suffix) and fields[3] == "0A":  # 0A: LISTEN
            waiting += int(fields[4].split(":")[1], 16)
    return waiting


class AcceptQueueSampler:
    """Samples :func:`accept_queue` in a thread while a run lasts."""

    def __init__(self, port: int, every: float = 0.2) -> None:
        self._port = port
        self._every = every
        self._stop = threading.Event()
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> AcceptQueueSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(accept_queue(self._port))  # after the run: never accepted

    def _sample(self) -> None:
        while not self._stop.wait(self._every):
            self.samples.append(accept_queue(self._port))


def raise_open_files_limit(needed: int) -> None:
    """wrk and the servers each hold one descriptor per connection; children inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        raise RuntimeError(f"the open-files limit is {soft}; the burst needs {needed}")


def start_bare(running: Stack, processes: int) -> Service:
    """``processes`` copies of the bare endpoint on one port (``SO_REUSEPORT``)."""
    port = free_port()
    procs = [
        running.spawn(f"bare-{port}-{i}", [PYTHON, "-m", "tests.bench.bare_app", str(port)])
        for i in range(processes)
    ]
    url = f"http://127.0.0.1:{port}"
    running.wait_until("bare app", lambda: http_ok(f"{url}/readyz"), procs, 30)
    return Service(url, port, procs)


@dataclass(frozen=True)
class Measured:
    summary: dict[str, Any]
    """wrk's own numbers (tests/bench/wrk/post_issue.lua prints them)."""
    statuses: dict[str, int]
    overflows: int
    accept_queue_max: int
    never_accepted: int


def wrk_burst(running: Stack, url: str, path: str, body: str, profile: BurstProfile) -> Measured:
    """One burst, with the kernel's view of the server's listen queue during it."""
    argv = [
        find_binary("wrk"), "-t1", f"-c{profile.connections}", f"-d{profile.seconds}s",
        "--timeout", f"{profile.timeout_seconds}s", "-s", str(WRK_SCRIPT), url,
    ]  # fmt: skip
    env = dict(os.environ, BENCH_PATH=path, BENCH_BODY=body, BENCH_UID_MAX="10000000")
    before = listen_overflows()
    with AcceptQueueSampler(int(url.rsplit(":", 1)[1])) as queue:
        proc: Proc = running.spawn(f"wrk-burst-{time.monotonic_ns()}", argv, env=env)
        proc.popen.wait(timeout=profile.seconds + profile.timeout_seconds + 60)
    overflows = listen_overflows() - before
    output = proc.log_path.read_text()
    if proc.popen.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.popen.returncode}): {output[-1000:]}")
    statuses = wrk_json(output, "BENCH_STATUS")
    return Measured(
        summary=wrk_json(output, "BENCH_SUMMARY"),
        statuses={str(k): int(v) for k, v in statuses.items()},
        overflows=overflows,
        accept_queue_max=max(queue.samples),
        never_accepted=queue.samples[-1],
    )


def _run(target: str, route: str, processes: int, measured: Measured) -> BurstRun:
    summary, statuses = measured.summary, measured.statuses
    seconds = summary["duration_us"] / 1e6
    timeouts = int(summary["errors_timeout"])
    socket_errors = sum(int(summary[k]) for k in ("errors_connect", "errors_read", "errors_write"))
    status_5xx = sum(n for code, n in statuses.items() if code.isdigit() and int(code) >= 500)
    failed = timeouts + socket_errors + status_5xx + measured.never_accepted
    attempted = (
        int(summary["requests"]) + timeouts + int(summary["errors_connect"])
        + measured.never_accepted
    )  # fmt: skip
    return BurstRun(
        target=target,
        route=route,
        processes=processes,
        rps=summary["requests"] / seconds,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        requests=int(summary["requests"]),
        failed=failed,
        failed_pct=100 * failed / max(attempted, 1),
        timeouts=timeouts,
        socket_errors=socket_errors,
        status_5xx=status_5xx,
        listen_overflows=measured.overflows,
        accept_queue_max=measured.accept_queue_max,
        never_accepted=measured.never_accepted,
        statuses=statuses,
    )


async def _drop_invariants(
    pool: aiomysql.Pool, redis: Redis, coupon_id: int, accepted: int, failed: int
) -> dict[str, Any]:
    """wrk cannot say who was accepted, only how many: with no failed request (a timeout may or
    may not have reserved), rows = answers that said accepted, and the usual checks hold."""
    left = await checks.wait_drained(redis, coupon_id, within=120)
    report = await checks.check_coupon(pool, redis, coupon_id, accepted=None)
    problems = report.problems()
    if left:
        problems.append(f"not drained within 120 s: {left} entries left")
    if failed == 0 and report.rows != accepted:
        problems.append(f"I3/I4 {accepted} answers said accepted, {report.rows} rows")
    if failed and not accepted <= report.rows <= accepted + failed:
        problems.append(f"{accepted} accepted and {failed} unknown, yet {report.rows} rows")
    return {**report.as_dict(), "accepted_answers": accepted, "problems": problems}


async def burst_phase(running: Stack, profile: BurstProfile) -> dict[str, Any]:
    """Every target under the same burst, ``rounds`` times, interleaved."""
    raise_open_files_limit(2 * profile.connections + 1024)
    settings = running.settings()
    redis = redis_client.connect(running.redis_url, socket_timeout=10)
    pool = await create_pool(settings.mysql, maxsize=2)
    runs: list[BurstRun] = []
    drops: list[dict[str, Any]] = []
    workers = running.start_workers(2)
    try:
        for round_number in range(1, profile.rounds + 1):
            for processes in (1, 2):
                bare = start_bare(running, processes)
                try:
                    measured = wrk_burst(running, bare.url, "/issue", '{"user_id":%d}', profile)
                finally:
                    running.stop(bare.procs)
                runs.append(_run("bare", "bare", processes, measured))
                _log(round_number, runs[-1])
                gateway = running.start_gateway(processes=processes, name=f"burst-{processes}")
                try:
                    for route in ROUTES:
                        run = await _gateway_burst(
                            running, gateway, route, processes, profile=profile,
                            pool=pool, redis=redis, drops=drops,
                        )  # fmt: skip
                        runs.append(run)
                        _log(round_number, runs[-1])
                finally:
                    running.stop(gateway.procs)
    finally:
        running.stop(workers)
        pool.close()
        await pool.wait_closed()
        await redis.aclose()
    return summarise(runs, drops, profile)


async def _gateway_burst(
    running: Stack,
    gateway: Service,
    route: str,
    processes: int,
    *,
    profile: BurstProfile,
    pool: aiomysql.Pool,
    redis: Redis,
    drops: list[dict[str, Any]],
) -> BurstRun:
    path, body, success = ROUTES[route]
    async with aiohttp.ClientSession() as session:
        coupon = await checks.create_coupon(
            session, gateway.url, running.admin_token, total=profile.stock, title=f"burst-{route}"
        )
    measured = wrk_burst(
        running, gateway.url, path.format(coupon=coupon), body.format(coupon=coupon), profile
    )
    run = _run("gateway", route, processes, measured)
    accepted = run.statuses.get(success, 0)
    drop = await _drop_invariants(pool, redis, coupon, accepted, run.failed)
    drops.append({"route": route, "processes": processes, **drop})
    return run


def _log(round_number: int, run: BurstRun) -> None:
    print(
        f"==> burst round {round_number} {run.target:7} {run.route:6} x{run.processes}:"
        f" {run.rps:8,.0f} req/s p50 {run.p50_ms:7.1f} ms p99 {run.p99_ms:7.1f} ms"
        f" failed {run.failed} ({run.failed_pct:.3f} %) overflows {run.listen_overflows}"
        f" accept queue max {run.accept_queue_max} never accepted {run.never_accepted}",
        flush=True,
    )


def summarise(
    runs: list[BurstRun], drops: list[dict[str, Any]], profile: BurstProfile
) -> dict[str, Any]:
    """Medians per (target, route, processes), and each gateway's ratios to bare's runs."""
    groups: dict[tuple[str, str, int], list[BurstRun]] = {}
    for run in runs:
        groups.setdefault((run.target, run.route, run.processes), []).append(run)
    table: dict[str, dict[str, Any]] = {}
    for (target, route, processes), group in groups.items():
        bare = groups[("bare", "bare", processes)]
        table[f"{target}-{route}-x{processes}"] = {
            "target": target,
            "route": route,
            "processes": processes,
            "rps": statistics.median(r.rps for r in group),
            "p50_ms": statistics.median(r.p50_ms for r in group),
            "p99_ms": statistics.median(r.p99_ms for r in group),
            "failed": sum(r.failed for r in group),
            "failed_pct": 100
            * sum(r.failed for r in group)
            / max(sum(r.requests + r.timeouts + r.never_accepted for r in group), 1),
            "listen_overflows": max(r.listen_overflows for r in group),
            "accept_queue_max": max(r.accept_queue_max for r in group),
            "never_accepted": sum(r.never_accepted for r in group),
            "rps_vs_bare": statistics.median(
                r.rps / b.rps for r, b in zip(group, bare, strict=True)
            ),
            "p99_vs_bare": statistics.median(
                r.p99_ms / max(b.p99_ms, 0.001) for r, b in zip(group, bare, strict=True)
            ),
            "overflows_vs_bare": max(r.listen_overflows for r in group)
            - max(b.listen_overflows for b in bare),
        }
    return {
        "profile": asdict(profile),
        "runs": [asdict(run) for run in runs],
        "table": table,
        "drops": drops,
        "invariants_ok": all(not drop["problems"] for drop in drops),
    }
