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

What the live feed removes (``--feed``, default ``compare``): the same drop runs twice on the
same stack, each on a coupon, gateway and workers of its own, first with clicking users only
(``CouponDropUser``, who click to the end whatever the answers say), then with
``--feed-user-share`` of ``FeedDropUser`` (who follow ``GET /v1/coupons/{id}/events`` and stop
clicking once told ``sold_out``). The load test follows the feed itself and takes the moment
it hears ``sold_out`` as the drop's sold-out; the locustfile counts when each issue request was
sent (per 10 ms, per user class), so the summary shows, for both drops, the issue requests in
all, per user and sent after the sold-out, and how much of it the feed removed. The second
drop's files are under ``feed/``. ``--feed off`` runs only the first drop (the load test as it
was), ``--feed on`` only the second (with a mix, ``--feed-user-share 0.5``, the two user types
are compared within the one drop, per user). ``--arrive-early S`` starts the users S seconds
before the window opens: the clicking ones hammer the closed window, the feed ones wait for
``started``.
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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
from tests.sse import EventReader

LOCUSTFILE = REPO / "deploy" / "locust" / "locustfile.py"
ISSUE_ROUTES = ("native", "seed")
"""The first word of the locustfile's issue entries (``native accepted``); ``feed ...`` entries
are the feed users' connections."""
CLICKING, FEEDING = "CouponDropUser", "FeedDropUser"


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


def parse_lead(text: str) -> int:
    """Like :func:`parse_duration`, and ``0`` is allowed."""
    return 0 if text.strip() in ("0", "0s") else parse_duration(text)


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
    parser.add_argument(
        "--feed",
        choices=("compare", "off", "on"),
        default="compare",
        help="compare (default): the drop with clicking users, then with feed users, and what"
        " the feed removed; off: clicking users only; on: feed users only (or the mix)",
    )
    parser.add_argument(
        "--feed-user-share",
        type=float,
        default=1.0,
        help="share of FeedDropUsers in the feed drop (0..1, default 1); below 1 the drop"
        " also compares the two user types per user",
    )
    parser.add_argument(
        "--arrive-early",
        type=parse_lead,
        default=0,
        help="start the users this long before the window opens (default 0: at the opening)",
    )
    parser.add_argument("--report-dir", type=Path, help="default reports/<timestamp>")
    parser.add_argument("--keep", action="store_true", help="keep the stack's folder and logs")
    parser.set_defaults(**SHAPES[shape.shape])
    args = parser.parse_args(argv)
    if args.users <= 0 or args.spawn_rate <= 0 or args.processes <= 0 or args.workers < 0:
        parser.error("users, spawn rate and processes must be positive; workers 0 or more")
    if not 0 <= args.seed_route_share <= 1:
        parser.error("--seed-route-share must be between 0 and 1")
    if not 0 < args.feed_user_share <= 1:
        parser.error("--feed-user-share must be above 0 and at most 1")
    return args


@dataclass(frozen=True)
class Plan:
    """One drop of the run: who clicks, and where its files go."""

    label: str
    feed_user_share: float
    folder: Path


def plans(args: argparse.Namespace, report: Path) -> list[Plan]:
    share = args.feed_user_share
    feed_label = "feed users" if share == 1 else f"{share:.0%} feed users"
    clicking = Plan("clicking users", 0.0, report)
    if args.feed == "off":
        return [clicking]
    if args.feed == "on":
        return [Plan(feed_label, share, report)]
    return [clicking, Plan(feed_label, share, report / "feed")]


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


def locust_outcomes(
    final_json: Path,
) -> tuple[dict[str, int], dict[str, dict[str, Any]], dict[str, Any]]:
    """Issue requests by outcome summed over routes, each entry (``<route> <outcome>``, the
    feed users' ``feed <outcome>`` connections, ``Aggregated``), and the rest of the
    locustfile's ``--final-stats`` (``user_classes``, ``feed``), written after every user
    stopped."""
    final: dict[str, Any] = json.loads(final_json.read_text())
    extra = {key: final.pop(key, {}) for key in ("user_classes", "feed")}
    entries: dict[str, dict[str, Any]] = final
    by_outcome: Counter[str] = Counter()
    for name, entry in entries.items():
        route, _, outcome = name.partition(" ")
        if route in ISSUE_ROUTES and outcome:
            by_outcome[outcome] += int(entry["requests"])
    return dict(by_outcome), entries, extra


def sent_between(sent_per_10ms: dict[str, int], start: float | None, end: float | None) -> int:
    """Issue requests sent from ``start`` to ``end`` (epoch seconds; None: no bound), from the
    locustfile's 10 ms counts: a bucket counts when it lies wholly inside, so each bound may
    leave out 10 ms."""
    total = 0
    for bucket, count in sent_per_10ms.items():
        begins = int(bucket) / 100
        if (start is None or begins >= start) and (end is None or begins + 0.01 <= end):
            total += count
    return total


def last_sent(sent_per_10ms: dict[str, int]) -> float | None:
    """The start of the last 10 ms in which an issue request was sent (epoch seconds)."""
    return max((int(b) / 100 for b, n in sent_per_10ms.items() if n), default=None)


def first_sent(sent_per_10ms: dict[str, int], since: float) -> float | None:
    """The start of the first 10 ms from ``since`` on in which an issue request was sent."""
    return min((int(b) / 100 for b, n in sent_per_10ms.items() if n and int(b) / 100 >= since),
               default=None)  # fmt: skip


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
                route, _, outcome = name.partition(" ")
                if route not in ISSUE_ROUTES or not outcome:
                    outcome = name  # the feed users' connections keep their whole name
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
    drops: list[dict[str, Any]] = []
    with stack(keep=args.keep) as running:
        for number, plan in enumerate(plans(args, report), 1):
            plan.folder.mkdir(parents=True, exist_ok=True)
            log(f"==> drop {number}: {plan.label}")
            drops.append(await _drop(args, running, plan))
        processes = running.processes()
        stack_folder = str(running.root)
    for drop in drops:
        drop["processes"] = processes
        drop["stack_folder"] = stack_folder
    result: dict[str, Any] = {**drops[0]}
    if len(drops) > 1:
        result["feed_drop"] = drops[1]
    result["feed_effect"] = feed_effect(drops)
    result["ok"] = all(drop["ok"] for drop in drops)
    (report / "run.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_summary(report, args, result)
    return 0 if result["ok"] else 1


async def _drop(args: argparse.Namespace, running: Stack, plan: Plan) -> dict[str, Any]:
    """One drop on a coupon, gateway and workers of its own (the counters and histograms it
    reads then hold this drop only); its files in ``plan.folder``."""
    folder, clients = plan.folder, plan.folder / "clients"
    log(f"==> starting {args.processes} gateway process(es) and {args.workers} worker(s)")
    gateway = running.start_gateway(processes=args.processes, name="gateway")
    workers = running.start_workers(args.workers)
    redis = redis_client.connect(running.redis_url, socket_timeout=10)
    pool = await create_pool(running.settings().mysql, maxsize=2)
    heard: list[tuple[str, float, dict[str, Any]]] = []
    watcher: asyncio.Task[None] | None = None
    try:
        async with aiohttp.ClientSession() as session:
            # Created ahead of its window, as a real drop is (the workers read its stream when
            # the first request comes); the users arrive --arrive-early before it opens.
            lead = max(checks.discovery_lead_seconds(running.settings()), args.arrive_early)
            opens_at = datetime.now(UTC) + timedelta(seconds=lead)
            coupon_id = await checks.create_coupon(
                session, gateway.url, running.admin_token, total=args.stock, title="loadtest",
                opens_at=opens_at,
            )  # fmt: skip
            watcher = asyncio.create_task(_watch(gateway.url, coupon_id, heard))
            await checks.wait_until(opens_at - timedelta(seconds=args.arrive_early))
            seconds = args.arrive_early + args.duration
            early = f", arriving {args.arrive_early} s early" if args.arrive_early else ""
            log(
                f"==> coupon {coupon_id}: {args.stock:,} coupons; locust {args.users} users"
                f" (+{args.spawn_rate:g}/s) for {args.duration} s{early},"
                f" {plan.feed_user_share:.0%} FeedDropUser, user ids 1..{args.user_ids:,}"
            )
            argv = [
                PYTHON, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
                "--host", gateway.url, "-u", str(args.users), "-r", str(args.spawn_rate),
                "-t", f"{seconds}s", "--stop-timeout", "10",
                "--csv", str(folder / "locust"), "--csv-full-history",
                "--html", str(folder / "locust.html"), "--exit-code-on-error", "0",
                "--coupon-id", str(coupon_id), "--user-id-min", "1",
                "--user-id-max", str(args.user_ids),
                "--seed-route-share", str(args.seed_route_share),
                "--seed-route", args.seed_route, "--accepted-dir", str(clients),
                "--feed-user-share", str(plan.feed_user_share),
                "--final-stats", str(folder / "locust_final.json"),
            ]  # fmt: skip
            if args.locust_processes != 1:
                argv += ["--processes", str(args.locust_processes)]
            locust = running.spawn(f"locust-{coupon_id}", argv)
            started = time.monotonic()
            await _progress(
                session, url=gateway.url, pool=pool, redis=redis, coupon_id=coupon_id,
                args=args, seconds=seconds, locust=locust, started=started,
            )  # fmt: skip
            elapsed = time.monotonic() - started
            await _stop_watching(watcher)
            if locust.popen.returncode != 0:
                raise RuntimeError(
                    f"locust exited with {locust.popen.returncode}:\n{locust.log_tail(30)}"
                )
            (folder / "locust.log").write_text(locust.log_path.read_text(errors="replace"))
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
        seen, rows, extra = locust_outcomes(folder / "locust_final.json")
        accepted = read_users(clients, "accepted")
        unknown = read_users(clients, "unknown")
        invariants = await checks.check_coupon(
            pool, redis, coupon_id, accepted=accepted, unknown=unknown
        )
    finally:
        await _stop_watching(watcher)
        running.stop([*workers, *gateway.procs])
        pool.close()
        await pool.wait_closed()
        await redis.aclose()
    chart(folder / "locust_stats_history.csv", folder / "chart.png")
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
        "label": plan.label,
        "feed_user_share": plan.feed_user_share,
        "folder": str(folder),
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
        "facts": drop_facts(opens_at.timestamp(), heard, extra),
        "gateway_latency": server_latency,
        "time_to_issue": waits,
        "gateway_url": gateway.url,
        "machine": machine(),
        "ok": invariants.ok and not mismatched and told_accepted == len(set(accepted)),
    }


async def _watch(url: str, coupon_id: int, heard: list[tuple[str, float, dict[str, Any]]]) -> None:
    """Follow the coupon's feed as one more subscriber, until cancelled: each event's name,
    wall-clock arrival and data (reconnecting with ``Last-Event-ID`` when the stream ends)."""
    last_id = ""
    no_limit = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=no_limit) as session:
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                async with session.get(
                    f"{url}/v1/coupons/{coupon_id}/events", headers=headers
                ) as response:
                    reader = EventReader(response)
                    while (event := await reader.next(within=24 * 3600)) is not None:
                        heard.append((event.name, time.time(), event.data))
                        last_id = event.id or last_id
            except (aiohttp.ClientError, OSError, ValueError, AssertionError) as exc:
                log(f"    the load test's own feed subscription failed: {exc!r}; again in 1 s")
            await asyncio.sleep(1)


async def _stop_watching(watcher: asyncio.Task[None] | None) -> None:
    if watcher is not None and not watcher.done():
        watcher.cancel()
        await asyncio.wait([watcher])  # its end, without raising its cancellation here


def drop_facts(
    opens_at: float, heard: list[tuple[str, float, dict[str, Any]]], extra: dict[str, Any]
) -> dict[str, Any]:
    """When the window opened and the coupon sold out (the first ``sold_out`` the load test's
    own subscription heard), and for each user class: its users, issue requests in all,
    before the opening, after the sold-out, answered ``sold_out``; the feed users' counts."""
    sold_out_at = next((at for name, at, _ in heard if name == "sold_out"), None)
    classes: dict[str, Any] = {}
    for name, info in extra.get("user_classes", {}).items():
        sent: dict[str, int] = info.get("sent_per_10ms", {})
        users = int(info.get("users", 0))
        if not users and not sent:
            continue
        last = last_sent(sent)
        first = first_sent(sent, opens_at)
        classes[name] = {
            "users": users,
            "issue_requests": sum(sent.values()),
            "before_open": sent_between(sent, None, opens_at),
            "after_sold_out": (
                None if sold_out_at is None else sent_between(sent, sold_out_at, None)
            ),
            "answered_sold_out": int(info.get("answers", {}).get("sold_out", 0)),
            "answers": info.get("answers", {}),
            "first_sent_after_opening_ms": (
                None if first is None else round((first - opens_at) * 1000)
            ),
            "last_sent_after_sold_out_ms": (
                None if sold_out_at is None or last is None or last < sold_out_at
                else round((last - sold_out_at) * 1000)
            ),
        }  # fmt: skip
    return {
        "opens_at": opens_at,
        "sold_out_at": sold_out_at,
        "sold_out_after_opening_s": None if sold_out_at is None else sold_out_at - opens_at,
        "heard": Counter(name for name, _, _ in heard),
        "user_classes": classes,
        "feed": extra.get("feed", {}),
    }


def _side(label: str, classes: list[dict[str, Any]]) -> dict[str, Any]:
    """One side of the comparison: the sums over some user classes, and per user."""
    users = sum(c["users"] for c in classes)
    side: dict[str, Any] = {"label": label, "users": users}
    for key in ("issue_requests", "before_open", "after_sold_out", "answered_sold_out"):
        values = [c[key] for c in classes]
        side[key] = None if None in values else sum(values)
        side[f"{key}_per_user"] = None if side[key] is None or not users else side[key] / users
    return side


def feed_effect(drops: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How much the feed removed: the clicking drop against the feed drop (their totals, and
    per user), or, in a drop with both user types, the two types per user. None when there is
    nothing to compare."""
    if len(drops) == 2:
        how = "the same drop twice, clicking users only and then with feed users"
        sides = [
            _side(drop["label"], list(drop["facts"]["user_classes"].values())) for drop in drops
        ]
    else:
        classes = drops[0]["facts"]["user_classes"]
        if CLICKING not in classes or FEEDING not in classes:
            return None
        how = "one drop with both user types, per user"
        sides = [_side("clicking users", [classes[CLICKING]]),
                 _side("feed users", [classes[FEEDING]])]  # fmt: skip
    clicking, feeding = sides
    removed: dict[str, float | None] = {}
    for key in ("issue_requests", "before_open", "after_sold_out", "answered_sold_out"):
        before, after = clicking[f"{key}_per_user"], feeding[f"{key}_per_user"]
        removed[key] = None if before is None or after is None or not before else 1 - after / before
    return {"how": how, "clicking": clicking, "feed": feeding, "removed": removed}


async def _progress(
    session: aiohttp.ClientSession,
    *,
    url: str,
    pool: Any,
    redis: Any,
    coupon_id: int,
    args: argparse.Namespace,
    seconds: int,
    locust: Any,
    started: float,
) -> None:
    """One line every two seconds until locust exits (bounded by the run time plus margin)."""
    previous_total, previous_at = 0, started
    deadline = started + seconds + 120
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
            f"[{now - started:5.0f}s/{seconds}s] {rate:8,.0f} req/s | {shown or '-'}"
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


def _number(value: float | None, digits: int = 0) -> str:
    return "?" if value is None else f"{value:,.{digits}f}"


def _share(value: float | None) -> str:
    return "?" if value is None else f"{value:.1%}"


EFFECT_ROWS = (
    ("issue_requests", "in all"),
    ("after_sold_out", "sent after the sold-out"),
    ("answered_sold_out", "answered sold_out"),
    ("before_open", "sent before the window opened"),
)


def _effect_lines(
    effect: dict[str, Any], drops: list[dict[str, Any]], args: argparse.Namespace
) -> list[str]:
    clicking, feeding, removed = effect["clicking"], effect["feed"], effect["removed"]
    lines = [
        "## What the live feed removed",
        "",
        f"{effect['how'].capitalize()}; {clicking['users']:,} {clicking['label']} against"
        f" {feeding['users']:,} {feeding['label']}. The sold-out is the moment the load test's"
        ' own feed subscription heard `sold_out`; "removed" compares the requests per user.',
        "",
        f"| issue requests | {clicking['label']} | per user | {feeding['label']} | per user"
        " | removed |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, title in EFFECT_ROWS:
        if key == "before_open" and not args.arrive_early:
            continue
        lines.append(
            f"| {title} | {_number(clicking[key])} | {_number(clicking[f'{key}_per_user'], 1)}"
            f" | {_number(feeding[key])} | {_number(feeding[f'{key}_per_user'], 1)}"
            f" | {_share(removed[key])} |"
        )
    sold = [f"{_number(d['facts']['sold_out_after_opening_s'], 2)} s ({d['label']})" for d in drops]
    lines += ["", f"- sold out after the opening: {', '.join(sold)}"]
    return [*lines, ""]


def _feed_line(drop: dict[str, Any]) -> str | None:
    """What the feed users of one drop heard and did, or None without feed users."""
    facts = drop["facts"]
    feeding = facts["user_classes"].get(FEEDING)
    if feeding is None:
        return None
    heard: dict[str, int] = facts["feed"]
    connections = {
        name.split(" ", 1)[1]: row["requests"]
        for name, row in drop["locust_rows"].items()
        if name.startswith("feed ")
    }
    events = ", ".join(
        f"{name.removeprefix('event ')} {count:,}"
        for name, count in sorted(heard.items())
        if name.startswith("event ")
    )
    last = feeding["last_sent_after_sold_out_ms"]
    first = feeding["first_sent_after_opening_ms"]
    return (
        f"- feed users ({feeding['users']:,}): connections"
        f" {', '.join(f'{k} {v:,}' for k, v in sorted(connections.items())) or 'none'};"
        f" events heard: {events or 'none'}; stopped clicking {heard.get('clicking stopped', 0):,}"
        f" times, clicked without a feed {heard.get('clicking without a feed', 0):,} times;"
        f" their first issue request after the opening was sent {_number(first)} ms after it,"
        " their last"
        + (" before the sold-out" if last is None else f" {last:,} ms after the sold-out")
        + " (10 ms steps)"
    )


def _drop_lines(drop: dict[str, Any], args: argparse.Namespace, level: str) -> list[str]:
    """One drop's report: the set-up, the figures, the invariants, the outcomes, latency."""
    inv = drop["invariants"]
    rows = drop["locust_rows"]
    total = rows.get("Aggregated", {})
    lat = drop["gateway_latency"]
    facts = drop["facts"]
    feed_connections = sum(r["requests"] for n, r in rows.items() if n.startswith("feed "))
    sent = list(facts["user_classes"].values())
    after = [c["after_sold_out"] for c in sent]
    early = f", arriving {args.arrive_early} s before the opening" if args.arrive_early else ""
    feed_line = _feed_line(drop)
    return [
        f"- coupon {drop['coupon_id']}: {args.stock:,} in stock; locust {args.users} users"
        f" (+{args.spawn_rate:g}/s) for {args.duration} s{early} on {args.locust_processes}"
        f" locust process(es), {drop['feed_user_share']:.0%} of them FeedDropUser;"
        f" user ids 1..{args.user_ids:,}; seed route {args.seed_route}"
        f" for {args.seed_route_share:.0%} of requests",
        f"- {args.processes} gateway process(es), {args.workers} worker(s);"
        f" machine: {drop['machine']['nproc']} cores, {drop['machine']['cpu_model']},"
        f" {drop['machine']['ram_gib']} GiB",
        f"- requests: {total.get('requests', 0):,} at {total.get('rps', 0):,.0f} req/s"
        + (f" ({feed_connections:,} of them feed connections)" if feed_connections else "")
        + f"; latency p50 {total.get('p50_ms', '?')} ms, p95 {total.get('p95_ms', '?')} ms,"
        f" p99 {total.get('p99_ms', '?')} ms, max {total.get('max_ms', 0):.0f} ms",
        f"- sold out {_number(facts['sold_out_after_opening_s'], 2)} s after the opening (when"
        " the load test's own feed subscription heard `sold_out`); issue requests sent after"
        f" it: {_number(None if None in after else sum(after))} of"
        f" {sum(c['issue_requests'] for c in sent):,}",
        *([feed_line] if feed_line else []),
        f"- the gateway's own latency of the issue routes (its histogram, from its middleware to"
        f" the response): p50 <= {lat['p50_at_most_s']} s, p99 <= {lat['p99_at_most_s']} s,"
        f" {lat['over_1s']:,} of {lat['requests']:,} requests over 1 s; locust's figures add"
        " the time a request waits in the client and the kernel",
        _time_to_issue_line(drop["time_to_issue"]),
        f"- told accepted: {drop['accepted_told']:,}; unknown answers (5xx, resets,"
        f" timeouts): {drop['unknown']:,}; dead-lettered: {inv['dead_lettered']}",
        "",
        f"{level} Invariants (MySQL and Redis after draining)",
        "",
        f"- rows {inv['rows']:,} of total {inv['total_quantity']:,}"
        f" ({'within' if inv['rows'] <= (inv['total_quantity'] or inv['rows']) else 'OVER'})",
        f"- users with more than one row: {inv['duplicate_users']}",
        f"- accepted but lost: {inv['lost']}; rows for users never accepted: "
        f"{inv['unexpected_rows']}",
        f"- issued_quantity {inv['issued_quantity']:,} = rows {inv['rows']:,}:"
        f" {'yes' if inv['issued_quantity'] == inv['rows'] else 'NO'}",
        f"- left pending: {inv['pending']}",
        *(f"- PROBLEM: {p}" for p in drop["problems"]),
        "",
        f"{level} Outcomes: what locust saw vs the gateway's coupon_issue_requests_total",
        "",
        "| outcome | locust | gateway /metrics | equal |",
        "| --- | ---: | ---: | --- |",
        *(
            f"| {name} | {pair['locust']:,} | {pair['gateway']:,} |"
            f" {'yes' if pair['locust'] == pair['gateway'] else 'NO'} |"
            for name, pair in drop["outcomes"].items()
        ),
        "",
        f"{level} Latency by route and outcome (ms)",
        "",
        "| route outcome | requests | p50 | p95 | p99 | max |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {name} | {row['requests']:,} | {row['p50_ms']} | {row['p95_ms']} |"
            f" {row['p99_ms']} | {row['max_ms']:.0f} |"
            for name, row in sorted(rows.items())
        ),
        "",
    ]


def write_summary(report: Path, args: argparse.Namespace, result: dict[str, Any]) -> None:
    drops = [result, *([result["feed_drop"]] if "feed_drop" in result else [])]
    several = len(drops) > 1
    headline = " · ".join(
        f"{drop['label']}: {drop['invariants']['headline']}"
        if several
        else drop["invariants"]["headline"]
        for drop in drops
    )
    lines = [
        f"# Load test {report.name}",
        "",
        f"**{headline}**" + ("" if result["ok"] else " — **CHECK FAILED**"),
        "",
    ]
    if result.get("feed_effect"):
        lines += _effect_lines(result["feed_effect"], drops, args)
    for number, drop in enumerate(drops, 1):
        if several:
            folder = Path(drop["folder"]).relative_to(report).as_posix()
            where = "" if folder == "." else f" (its files under `{folder}/`)"
            lines += [f"## Drop {number}: {drop['label']}{where}", ""]
        lines += _drop_lines(drop, args, "###" if several else "##")
    lines += [
        "Files: `chart.png` (throughput by outcome, latency over time), `locust.html`,"
        " `locust_final.json` (the complete counts), `locust_stats.csv` (refreshed once a"
        " second, so it may miss the last second), `locust_stats_history.csv`,"
        " `locust_failures.csv`,"
        " `locust.log`, `run.json`, `clients/` (users told accepted or left unknown)"
        + ("; the feed drop's own under `feed/`." if several else "."),
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
    effect = json.loads((report / "run.json").read_text()).get("feed_effect")
    if effect:
        removed = effect["removed"]
        print(
            f"the feed removed {_share(removed['issue_requests'])} of the issue requests per"
            f" user, {_share(removed['after_sold_out'])} of those sent after the sold-out"
        )
    print(f"report: {report}")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
