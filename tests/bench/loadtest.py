"""``./scripts/loadtest``: a coupon drop under locust, then the proof that every number is right.

Starts a private stack (:mod:`tests.bench.stack`: Redis, MariaDB, N gateway processes, M workers, on
free ports under a temporary folder), creates the coupon, runs ``deploy/locust/locustfile.py``
headless while printing progress from the gateway's own ``/metrics`` and from MySQL, waits for
the workers to drain, then checks the invariants against MySQL with the list of users each
locust process was told "accepted", and compares the gateway's outcome counters with what locust
counted. Writes ``reports/<timestamp>/``: locust's CSV files and HTML report, ``chart.png``
(throughput by outcome, latency percentiles over time), ``summary.md`` and ``run.json``.
Exits 1 when an invariant or a count does not hold. Every process is stopped at the end, also
on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from shared.metrics import ISSUE_OUTCOMES
from shared.mysql.pool import create_pool
from shared.redis import client as redis_client
from tests.bench import checks, scrape, time_to_issue
from tests.bench.run import machine
from tests.bench.stack import PYTHON, Stack, stack
from tests.helpers import row_count
from tests.servers import REPO

LOCUSTFILE = REPO / "deploy" / "locust" / "locustfile.py"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``2m``, ``1h`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip()
    factor = units.get(text[-1:], 0)
    number = text[:-1] if factor else text
    seconds = int(number) * (factor or 1)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return seconds


# Named load shapes: defaults that an explicit option still overrides.
SHAPES: dict[str, dict[str, Any]] = {
    "default": {},
    # The original system's published test: 5,000 locust users without think time, started at
    # 500 per second, random user ids 1..10,000,000, every request on /v2/issue-async, a
    # coupon of 10,000, about a minute.
    "original": {
        "users": 5_000,
        "spawn_rate": 500,
        "duration": 60,
        "user_ids": 10_000_000,
        "seed_route_share": 1.0,
        "seed_route": "/v2/issue-async",
        "stock": 10_000,
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    shape_parser = argparse.ArgumentParser(add_help=False)
    shape_parser.add_argument("--shape", choices=sorted(SHAPES), default="default")
    shape, _ = shape_parser.parse_known_args(argv)
    parser = argparse.ArgumentParser(
        prog="scripts/loadtest", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="default",
        help="a named load shape; 'original' is the original system's 5,000-user test",
    )
    parser.add_argument("--users", type=int, default=500, help="locust users (default 500)")
    parser.add_argument("--spawn-rate", type=float, default=100, help="users started per second")
    parser.add_argument(
        "--duration", type=parse_duration, default=60, help="run time: 60, 90s, 5m (default 60s)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=int(os.environ.get("COUPON_GATEWAY_PROCESSES", "1")),
        help="gateway processes on one port (default $COUPON_GATEWAY_PROCESSES or 1)",
    )
    parser.add_argument("--workers", type=int, default=2, help="stream workers (default 2)")
    parser.add_argument(
        "--locust-processes",
        type=int,
        default=1,
        help="locust worker processes (locust --processes; -1 = one per core)",
    )
    parser.add_argument("--stock", type=int, default=10_000, help="coupons to hand out")
    parser.add_argument(
        "--user-ids", type=int, default=100_000, help="user ids drawn from 1..N (default 100000)"
    )
    parser.add_argument(
        "--seed-route-share", type=float, default=0.5, help="share of seed-route requests (0..1)"
    )
    parser.add_argument(
        "--seed-route", default="/v2/issue-async", help="seed route (/v1/issue is synchronous)"
    )
    parser.add_argument("--report-dir", type=Path, help="default reports/<timestamp>")
    parser.add_argument("--keep", action="store_true", help="keep the stack's folder and logs")
    parser.set_defaults(**SHAPES[shape.shape])
    args = parser.parse_args(argv)
    if args.users <= 0 or args.spawn_rate <= 0 or args.processes <= 0 or args.workers < 0:
        parser.error("users, spawn rate and processes must be positive; workers 0 or more")
    if not 0 <= args.seed_route_share <= 1:
        parser.error("--seed-route-share must be between 0 and 1")
    return args


# -- metrics -----------------------------------------------------------------------------------


async def gateway_outcomes(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    """``coupon_issue_requests_total`` by outcome, as one scrape of ``/metrics`` reports it."""
    counts: dict[str, int] = dict.fromkeys(ISSUE_OUTCOMES, 0)
    for family in text_string_to_metric_families(await scrape.text(session, f"{url}/metrics")):
        if family.name != "coupon_issue_requests":
            continue
        for sample in family.samples:
            if sample.name == "coupon_issue_requests_total":
                counts[sample.labels["outcome"]] = int(sample.value)
    return counts


async def gateway_latency(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """The gateway's own view of the issue routes' latency (``coupon_http_request_duration
    _seconds``, summed over routes and status classes): the time from its middleware's start
    to the response, without the time a request waits before the gateway reads it."""
    summary = scrape.histogram_bounds(
        [await scrape.text(session, f"{url}/metrics")],
        "coupon_http_request_duration_seconds",
        keep=lambda labels: "issue" in labels["route"],
    )
    return {"requests": summary.pop("count"), **summary}


# -- locust output -----------------------------------------------------------------------------


def locust_outcomes(final_json: Path) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """Requests by outcome summed over routes, and each ``<route> <outcome>`` entry, from the
    locustfile's ``--final-stats`` (written after every user stopped)."""
    entries: dict[str, dict[str, Any]] = json.loads(final_json.read_text())
    by_outcome: Counter[str] = Counter()
    for name, entry in entries.items():
        if name != "Aggregated" and " " in name:
            by_outcome[name.split(" ", 1)[1]] += int(entry["requests"])
    return dict(by_outcome), entries


def read_users(directory: Path, kind: str) -> list[int]:
    users: list[int] = []
    for path in sorted(directory.glob(f"{kind}-*.txt")):
        users.extend(int(line) for line in path.read_text().split())
    return users


def chart(history_csv: Path, png: Path) -> None:
    """Throughput by outcome (top) and latency percentiles (bottom) over time.

    Throughput comes from the growth of each entry's total count between two points where the
    aggregate changed (locust's own per-second rate is empty in distributed mode, where workers
    report every few seconds); latency from locust's rolling percentiles.
    """
    import matplotlib  # noqa: PLC0415 - loaded only when a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    counts: dict[int, dict[str, int]] = defaultdict(dict)
    latency: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with history_csv.open() as handle:
        for row in csv.DictReader(handle):
            stamp = int(row["Timestamp"])
            name = row["Name"]
            counts[stamp][name] = int(row["Total Request Count"])
            if name == "Aggregated":
                for percentile in ("50%", "95%", "99%"):
                    value = row.get(percentile, "N/A")
                    if value not in ("N/A", "") and int(row["Total Request Count"]) > 0:
                        latency[percentile].append((stamp, float(value)))
    stamps = sorted(counts)
    start = stamps[0] if stamps else 0
    rps: dict[str, list[tuple[int, float]]] = defaultdict(list)
    previous_stamp, previous = start, dict.fromkeys(["Aggregated"], 0)
    for stamp in stamps:
        now = counts[stamp]
        if now.get("Aggregated", 0) == previous.get("Aggregated", 0):
            continue
        seconds = max(stamp - previous_stamp, 1)
        by_outcome: dict[str, int] = defaultdict(int)
        for name, total in now.items():
            if name != "Aggregated":
                outcome = name.split(" ", 1)[1] if " " in name else name
                by_outcome[outcome] += total - previous.get(name, 0)
        for outcome, grown in by_outcome.items():
            rps[outcome].append((stamp - start, grown / seconds))
        previous_stamp, previous = stamp, now
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    for outcome in sorted(rps):
        points = rps[outcome]
        top.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=outcome)
    top.set_ylabel("requests/s")
    top.set_title("Throughput by outcome")
    top.legend(loc="upper right", fontsize="small")
    top.grid(alpha=0.3)
    for percentile, points in sorted(latency.items()):
        bottom.plot(
            [p[0] - start for p in points], [p[1] for p in points], label=f"p{percentile[:-1]}"
        )
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds since start")
    bottom.set_title("Latency percentiles, all requests (locust's rolling window)")
    bottom.legend(loc="upper right", fontsize="small")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)


# -- the run -----------------------------------------------------------------------------------


async def run(args: argparse.Namespace, report: Path) -> int:
    clients = report / "clients"
    with stack(keep=args.keep) as running:
        result = await _drop(args, running, report, clients)
        result["processes"] = running.processes()
        result["stack_folder"] = str(running.root)
    (report / "run.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_summary(report, args, result)
    return 0 if result["ok"] else 1


async def _drop(
    args: argparse.Namespace, running: Stack, report: Path, clients: Path
) -> dict[str, Any]:
    log(f"==> starting {args.processes} gateway process(es) and {args.workers} worker(s)")
    gateway = running.start_gateway(processes=args.processes, name="gateway")
    workers = running.start_workers(args.workers)
    redis = redis_client.connect(running.redis_url, socket_timeout=10)
    pool = await create_pool(running.settings().mysql, maxsize=2)
    try:
        async with aiohttp.ClientSession() as session:
            coupon_id = await checks.open_drop(
                session, gateway.url, running.admin_token, running.settings(),
                total=args.stock, title="loadtest",
            )  # fmt: skip
            log(
                f"==> coupon {coupon_id}: {args.stock:,} coupons; locust {args.users} users"
                f" (+{args.spawn_rate:g}/s) for {args.duration} s, user ids 1..{args.user_ids:,}"
            )
            argv = [
                PYTHON, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
                "--host", gateway.url, "-u", str(args.users), "-r", str(args.spawn_rate),
                "-t", f"{args.duration}s", "--stop-timeout", "10",
                "--csv", str(report / "locust"), "--csv-full-history",
                "--html", str(report / "locust.html"), "--exit-code-on-error", "0",
                "--coupon-id", str(coupon_id), "--user-id-min", "1",
                "--user-id-max", str(args.user_ids),
                "--seed-route-share", str(args.seed_route_share),
                "--seed-route", args.seed_route, "--accepted-dir", str(clients),
                "--final-stats", str(report / "locust_final.json"),
            ]  # fmt: skip
            if args.locust_processes != 1:
                argv += ["--processes", str(args.locust_processes)]
            locust = running.spawn("locust", argv)
            started = time.monotonic()
            await _progress(
                session, url=gateway.url, pool=pool, redis=redis, coupon_id=coupon_id,
                args=args, locust=locust, started=started,
            )  # fmt: skip
            elapsed = time.monotonic() - started
            if locust.popen.returncode != 0:
                raise RuntimeError(
                    f"locust exited with {locust.popen.returncode}:\n{locust.log_tail(30)}"
                )
            (report / "locust.log").write_text(locust.log_path.read_text(errors="replace"))
            log("==> load over; waiting for the workers to drain")
            left = await checks.wait_drained(redis, coupon_id, within=120)
            if left:
                log(f"    still {left} pending after 120 s")
            gateway_counts = await gateway_outcomes(session, gateway.url)
            server_latency = await gateway_latency(session, gateway.url)
            waits = await time_to_issue.from_rows(pool, coupon_id)
            waits["metric"] = await time_to_issue.from_metrics(
                session, [w.metrics_url for w in workers if w.metrics_url]
            )
        seen, rows = locust_outcomes(report / "locust_final.json")
        accepted = read_users(clients, "accepted")
        unknown = read_users(clients, "unknown")
        invariants = await checks.check_coupon(
            pool, redis, coupon_id, accepted=accepted, unknown=unknown
        )
    finally:
        running.stop([*workers, *gateway.procs])
        pool.close()
        await pool.wait_closed()
        await redis.aclose()
    chart(report / "locust_stats_history.csv", report / "chart.png")
    outcomes = sorted(set(seen) | {k for k, v in gateway_counts.items() if v})
    comparison = {
        name: {"locust": seen.get(name, 0), "gateway": gateway_counts.get(name, 0)}
        for name in outcomes
    }
    # Answers locust got without an HTTP status ("error") never reached a counter; everything
    # else must match one to one.
    mismatched = [
        name
        for name, pair in comparison.items()
        if name != "error" and pair["locust"] != pair["gateway"]
    ]
    told_accepted = len(accepted)
    return {
        "coupon_id": coupon_id,
        "seconds": elapsed,
        "invariants": invariants.as_dict(),
        "problems": invariants.problems(),
        "accepted_told": told_accepted,
        "accepted_duplicates_in_journal": told_accepted - len(set(accepted)),
        "unknown": len(unknown),
        "outcomes": comparison,
        "counts_match": not mismatched,
        "mismatched": mismatched,
        "locust_rows": rows,
        "gateway_latency": server_latency,
        "time_to_issue": waits,
        "gateway_url": gateway.url,
        "machine": machine(),
        "ok": invariants.ok and not mismatched and told_accepted == len(set(accepted)),
    }


async def _progress(
    session: aiohttp.ClientSession,
    *,
    url: str,
    pool: Any,
    redis: Any,
    coupon_id: int,
    args: argparse.Namespace,
    locust: Any,
    started: float,
) -> None:
    """One line every two seconds until locust exits (bounded by the run time plus margin)."""
    previous_total, previous_at = 0, started
    deadline = started + args.duration + 120
    while locust.alive():
        if time.monotonic() > deadline:
            raise RuntimeError("locust did not finish in time")
        await asyncio.sleep(2)
        try:
            counts = await gateway_outcomes(session, url)
        except aiohttp.ClientError:
            continue
        now = time.monotonic()
        total = sum(counts.values())
        rate = (total - previous_total) / max(now - previous_at, 1e-6)
        previous_total, previous_at = total, now
        issued = await row_count(pool, coupon_id)
        waiting = await checks.backlog(redis, coupon_id)
        shown = "  ".join(f"{k} {v:,}" for k, v in counts.items() if v)
        log(
            f"[{now - started:5.0f}s/{args.duration}s] {rate:8,.0f} req/s | {shown or '-'}"
            f" | issued {issued:,}/{args.stock:,} | pending {waiting:,}"
        )


def _time_to_issue_line(waits: dict[str, Any]) -> str:
    if not waits["rows"]:
        return "- time to issue: no rows"
    metric = waits["metric"]
    return (
        f"- time to issue (the 202 to the row in MySQL), {waits['rows']:,} rows:"
        f" p50 {waits['p50_s'] * 1000:,.0f} ms, p99 {waits['p99_s'] * 1000:,.0f} ms,"
        f" max {waits['max_s'] * 1000:,.0f} ms; the workers' histogram: p50 <="
        f" {metric['p50_at_most_s']} s, p99 <= {metric['p99_at_most_s']} s,"
        f" {metric['over_1s']:,} of {metric['rows']:,} over 1 s"
    )


def write_summary(report: Path, args: argparse.Namespace, result: dict[str, Any]) -> None:
    inv = result["invariants"]
    rows = result["locust_rows"]
    total = rows.get("Aggregated", {})
    lat = result["gateway_latency"]
    lines = [
        f"# Load test {report.name}",
        "",
        f"**{inv['headline']}**" + ("" if result["ok"] else " — **CHECK FAILED**"),
        "",
        f"- coupon {result['coupon_id']}: {args.stock:,} in stock; locust {args.users} users"
        f" (+{args.spawn_rate:g}/s) for {args.duration} s on {args.locust_processes}"
        f" locust process(es); user ids 1..{args.user_ids:,}; seed route {args.seed_route}"
        f" for {args.seed_route_share:.0%} of requests",
        f"- {args.processes} gateway process(es), {args.workers} worker(s);"
        f" machine: {result['machine']['nproc']} cores, {result['machine']['cpu_model']},"
        f" {result['machine']['ram_gib']} GiB",
        f"- requests: {total.get('requests', 0):,} at {total.get('rps', 0):,.0f} req/s;"
        f" latency p50 {total.get('p50_ms', '?')} ms, p95 {total.get('p95_ms', '?')} ms,"
        f" p99 {total.get('p99_ms', '?')} ms, max {total.get('max_ms', 0):.0f} ms",
        f"- the gateway's own latency of the issue routes (its histogram, from its middleware to"
        f" the response): p50 <= {lat['p50_at_most_s']} s, p99 <= {lat['p99_at_most_s']} s,"
        f" {lat['over_1s']:,} of {lat['requests']:,} requests over 1 s; locust's figures add"
        " the time a request waits in the client and the kernel",
        _time_to_issue_line(result["time_to_issue"]),
        f"- told accepted: {result['accepted_told']:,}; unknown answers (5xx, resets,"
        f" timeouts): {result['unknown']:,}; dead-lettered: {inv['dead_lettered']}",
        "",
        "## Invariants (MySQL and Redis after draining)",
        "",
        f"- rows {inv['rows']:,} of total {inv['total_quantity']:,}"
        f" ({'within' if inv['rows'] <= (inv['total_quantity'] or inv['rows']) else 'OVER'})",
        f"- users with more than one row: {inv['duplicate_users']}",
        f"- accepted but lost: {inv['lost']}; rows for users never accepted: "
        f"{inv['unexpected_rows']}",
        f"- issued_quantity {inv['issued_quantity']:,} = rows {inv['rows']:,}:"
        f" {'yes' if inv['issued_quantity'] == inv['rows'] else 'NO'}",
        f"- left pending: {inv['pending']}",
        *(f"- PROBLEM: {p}" for p in result["problems"]),
        "",
        "## Outcomes: what locust saw vs the gateway's coupon_issue_requests_total",
        "",
        "| outcome | locust | gateway /metrics | equal |",
        "| --- | ---: | ---: | --- |",
        *(
            f"| {name} | {pair['locust']:,} | {pair['gateway']:,} |"
            f" {'yes' if pair['locust'] == pair['gateway'] else 'NO'} |"
            for name, pair in result["outcomes"].items()
        ),
        "",
        "## Latency by route and outcome (ms)",
        "",
        "| route outcome | requests | p50 | p95 | p99 | max |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {name} | {row['requests']:,} | {row['p50_ms']} | {row['p95_ms']} |"
            f" {row['p99_ms']} | {row['max_ms']:.0f} |"
            for name, row in sorted(rows.items())
        ),
        "",
        "Files: `chart.png` (throughput by outcome, latency over time), `locust.html`,"
        " `locust_final.json` (the complete counts), `locust_stats.csv` (refreshed once a"
        " second, so it may miss the last second), `locust_stats_history.csv`,"
        " `locust_failures.csv`,"
        " `locust.log`, `run.json`, `clients/` (users told accepted or left unknown).",
        "",
    ]
    (report / "summary.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report = (args.report_dir or REPO / "reports" / stamp).resolve()
    try:
        report.mkdir(parents=True, exist_ok=True)
        code = uvloop.run(run(args, report))
    except KeyboardInterrupt:
        log("interrupted; every process the load test started is stopped")
        raise SystemExit(130) from None
    summary = (report / "summary.md").read_text()
    print(summary.split("\n")[2])
    print(f"report: {report}")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
