"""The live feed under a drop: what 5,000 subscribers cost the gateway's answers, and how soon
each of them hears that the coupon sold out.

One gateway process is under test (load shedding off: no worker runs, as in the HTTP phase).
The subscribers are held by a separate process, this module run as a script
(``python -m tests.bench.feed``): one :class:`asyncio.Protocol` per connection on uvloop, no
coroutine per subscriber and no parsing beyond looking for two markers, so 5,000 of them cost
the shared two cores little (each run reports the holder's CPU time beside the gateway's).

**Rates with and without subscribers.** Every round measures, under ``wrk`` like the HTTP
phase, the accept rate (202s on a fresh coupon of 10⁹: finite, so each feed poll finds a new
``remaining``; every subscriber gets one at each poll, as during a real drop, as far as the
feed's budget of ``remaining`` writes lets it)
and the sold-out answer rate (409s on a coupon of 1, sold), once with the subscribers connected
to the accepting coupon and once without; the order alternates from round to round, so a drift
of the machine hits both sides. A ratio is the median over the rounds of the same round's
with ÷ without. During the sold-out runs the subscribers' coupon does not change: they cost
what idle subscribers of a sold-out drop cost (the heartbeat and the poll), nothing more. A
third run, a note beside the goals, accepts on another coupon while they stay connected:
what being connected costs, apart from the ``remaining`` events they are sent.

**Sold out to the last subscriber told.** Then, each round, the subscribers connect to a fresh
coupon of a few thousand and wait (every one has its snapshot first); ``wrk`` sells it and goes
on for some seconds with "sold out" answers, as a drop's crowd does. The holder writes down
when each subscriber's ``sold_out`` event arrived (``time.time()``, read as the chunk is
handed to the protocol, so the holder's own reading delay is included). The reference is the
moment the reservation that took the last slot ran, as Redis's clock had it: ``issue.lua``
writes that ``TIME`` (ms, floored: latencies read up to 1 ms long) into every stream entry, and
the coupon's last entry is the last slot's. Holder and bench share this machine's clock; the
offset of Redis's clock from it is measured (the quickest of a few ``TIME`` round trips, about
0 for a local Redis) and applied, so the latency is on Redis's clock whichever host Redis is
on. Reported per drop: p50 / p99 / max over the subscribers, the first told and the spread;
headline figures are medians over the drops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import uvloop
from redis.asyncio import Redis

from shared import keys
from shared.redis import client as redis_client
from tests.bench import burst, checks, scrape
from tests.bench.stack import PYTHON, Proc, Service, Stack
from tests.bench.time_to_issue import percentile

if TYPE_CHECKING:
    from tests.bench.run import WrkResult

    Wrk = Callable[[Stack, str, str, str, float, int], WrkResult]
    """One wrk measurement: (stack, base URL, path, body, seconds, connections)."""


@dataclass(frozen=True)
class FeedProfile:
    subscribers: int
    rounds: int
    warmup: int
    duration: int
    """Seconds of each measured wrk run (each rate, with and without)."""
    connections: int
    drop_stock: int
    """Small, so the drop sells out early in the crowd's run even when the feed slows the
    gateway's accepting to a few hundred a second (as 5,000 subscribers do, on this box)."""
    drop_seconds: int
    """How long each wrk run on a drop lasts (a new one starts while it is not sold out)."""
    told_within: float
    """How long the holder waits for every subscriber's ``sold_out`` before it reports."""


FULL = FeedProfile(
    subscribers=5_000, rounds=3, warmup=1, duration=5, connections=64,
    drop_stock=500, drop_seconds=4, told_within=60,
)  # fmt: skip
QUICK = FeedProfile(
    subscribers=50, rounds=1, warmup=1, duration=1, connections=16,
    drop_stock=50, drop_seconds=2, told_within=30,
)  # fmt: skip

ACCEPT_STOCK = 1_000_000_000
"""Finite, unlike the HTTP phase's accept coupon: an unlimited coupon has no remaining events."""
CONDITIONS = ("without", "with")
OPENING_AT_ONCE = 200
"""Subscribers opening at the same time: in waves, as clients arrive, well within the gateway's
listen backlog (a listen-queue overflow would cost a SYN retry of a second)."""
READY_TAG = "FEED_READY"
REPORT_TAG = "FEED_REPORT"
OK_STATUS = b"HTTP/1.1 200 "
SNAPSHOT = b"event: snapshot\n"
SOLD_OUT = b"event: sold_out\n"
_KEEP = max(len(SNAPSHOT), len(SOLD_OUT)) - 1
"""The bytes of one read a marker can straddle into the next."""
SUBSCRIBERS_GAUGE = "coupon_feed_subscribers"
REFUSED_COUNTER = "coupon_feed_refused_total"
GOALS = {
    "feed_accept_with_vs_without": 0.9,  # at least
    "feed_sold_out_with_vs_without": 0.9,  # at least
}
TOLD_P99_GOAL_MS = 500.0  # at most
SELL_RUNS = 5
"""wrk runs on a drop, at most, before the bench gives up on selling it out."""


# -- the holder: python -m tests.bench.feed ----------------------------------------------------


class Subscription(asyncio.Protocol):
    """One feed connection that remembers when its ``sold_out`` came, and nothing else."""

    def __init__(self, request: bytes, holder: Holder) -> None:
        self._request = request
        self._holder = holder
        self._window = b""
        self._status_checked = False
        self.snapshot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.told_at: float | None = None
        self.received = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        arrived = time.time()  # first: the holder's own work is not added to the figure
        self.received += len(data)
        if self.told_at is not None:
            return
        window = self._window + data
        if not self._status_checked and len(window) >= len(OK_STATUS):
            if not window.startswith(OK_STATUS):
                self._fail(f"answered {window[:64]!r}")
                return
            self._status_checked = True
        if not self.snapshot.done():
            at = window.find(SNAPSHOT)
            if at < 0:
                self._window = window[-_KEEP:]
                return
            self.snapshot.set_result(None)
            window = window[at + len(SNAPSHOT) :]
        if SOLD_OUT in window:
            self.told_at = arrived
            self._holder.settled()
        else:
            self._window = window[-_KEEP:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.snapshot.done():
            self.snapshot.set_exception(ConnectionError(f"closed before the snapshot: {exc!r}"))
        elif self.told_at is None and not self._holder.closing:
            self.lost = True
            self._holder.settled()

    def _fail(self, why: str) -> None:
        if not self.snapshot.done():
            self.snapshot.set_exception(ConnectionError(why))
        assert self.transport is not None
        self.transport.close()


class Holder:
    """Every subscription of one holder process, and when all of them are settled (told
    ``sold_out``, or cut off before it)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.subscriptions: list[Subscription] = []
        self.closing = False
        self._settled = 0
        self.all_settled = asyncio.Event()

    def settled(self) -> None:
        self._settled += 1
        if self._settled >= self.count:
            self.all_settled.set()

    async def open(self, host: str, port: int, path: str) -> None:
        """Connect every subscriber and read up to its snapshot, ``OPENING_AT_ONCE`` at a time."""
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(OPENING_AT_ONCE)

        async def one() -> None:
            async with gate:
                _, subscription = await loop.create_connection(
                    lambda: Subscription(request, self), host, port
                )
                self.subscriptions.append(subscription)
                await asyncio.wait_for(subscription.snapshot, 30)

        await asyncio.gather(*(one() for _ in range(self.count)))

    def report(self, cpu_opening: float, cpu_ready: float) -> dict[str, Any]:
        told = [s.told_at for s in self.subscriptions if s.told_at is not None]
        return {
            "subscribers": len(self.subscriptions),
            "told": len(told),
            "lost": sum(s.lost for s in self.subscriptions),
            "told_at": told,
            "bytes_received": sum(s.received for s in self.subscriptions),
            "cpu_seconds_opening": cpu_ready - cpu_opening,
            "cpu_seconds_holding": _cpu_seconds() - cpu_ready,
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }

    def close(self) -> None:
        self.closing = True
        for subscription in self.subscriptions:
            if subscription.transport is not None:
                subscription.transport.close()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _say(tag: str, payload: dict[str, Any]) -> None:
    """One line for the bench, which reads this process's log (its stdout)."""
    sys.stdout.write(f"{tag} {json.dumps(payload)}\n")
    sys.stdout.flush()


async def hold(host: str, port: int, path: str, count: int, within: float | None) -> None:
    """Open ``count`` subscribers, say so, then wait until every one is settled, ``within``
    seconds pass, or SIGTERM comes (the bench stops a holder whose coupon never sells out);
    report and leave."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    holder = Holder(count)
    started, cpu_opening = time.perf_counter(), _cpu_seconds()  # not the imports before
    await holder.open(host, port, path)
    cpu_ready = _cpu_seconds()
    _say(READY_TAG, {"subscribers": count, "open_seconds": time.perf_counter() - started})
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, holder.all_settled)]
    await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    for waiting in waits:
        waiting.cancel()
    _say(REPORT_TAG, holder.report(cpu_opening, cpu_ready))
    holder.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="hold live feed subscribers for the bench")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True, help="/v1/coupons/ID/events")
    parser.add_argument("--subscribers", type=int, required=True)
    parser.add_argument("--within", type=float, help="seconds to wait for every sold_out")
    args = parser.parse_args(argv)
    uvloop.run(hold(args.host, args.port, args.path, args.subscribers, args.within))


# -- the bench side ----------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def start_holder(
    running: Stack, gateway: Service, coupon_id: int, count: int, within: float | None = None
) -> Proc:
    argv = [
        PYTHON, "-m", "tests.bench.feed", "--port", str(gateway.port),
        "--path", f"/v1/coupons/{coupon_id}/events", "--subscribers", str(count),
        *(["--within", str(within)] if within is not None else []),
    ]  # fmt: skip
    return running.spawn(f"feed-holder-{coupon_id}", argv)


async def said(proc: Proc, tag: str, within: float) -> dict[str, Any]:
    """The JSON a holder printed after ``tag``; fails, with its log, if it exits without."""
    deadline = time.monotonic() + within
    while True:
        alive = proc.alive()  # before reading: a holder that said it and left is fine
        found = re.search(rf"^{tag} (.*)$", proc.log_path.read_text(), flags=re.M)
        if found is not None:
            payload: dict[str, Any] = json.loads(found.group(1))
            return payload
        if not alive or time.monotonic() > deadline:
            state = "exited" if not alive else f"said nothing within {within:.0f} s"
            raise RuntimeError(f"{proc.name} {state} before {tag}:\n{proc.log_tail()}")
        await asyncio.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def feed_metrics(url: str) -> dict[str, float]:
    """The gateway's live-feed gauge and its refusals (full, slow) so far."""
    async with aiohttp.ClientSession() as session:
        exposition = await scrape.text(session, f"{url}/metrics")
    return {
        "subscribers": scrape.counter_total(exposition, SUBSCRIBERS_GAUGE),
        "refused": scrape.counter_total(exposition, REFUSED_COUNTER),
    }


async def noticed_gone(running: Stack, gateway: Service) -> float:
    """Seconds until the gateway counts no subscriber, after a holder closed every connection.

    aiohttp does not tell a handler that its client left: the feed's sweep (each second) finds
    the closed transports, and until then they hold ``COUPON_MAX_SUBSCRIBERS`` slots the next
    holder would be refused for (``FEED_FULL``).
    """
    within = running.settings().feed_heartbeat_seconds + 10
    started = time.perf_counter()
    while (await feed_metrics(gateway.url))["subscribers"] > 0:
        if time.perf_counter() - started > within:
            raise RuntimeError(f"the gateway still counts subscribers {within:.0f} s after")
        await asyncio.sleep(0.1)
    return time.perf_counter() - started


async def clock_offset(redis: Redis) -> tuple[float, float]:
    """Redis's clock minus this machine's, in seconds, from the quickest of five ``TIME`` round
    trips (its midpoint), and that round trip."""
    best: tuple[float, float] | None = None
    for _ in range(5):
        before = time.time()
        seconds, micros = await redis.time()
        after = time.time()
        sample = (int(seconds) + int(micros) / 1e6 - (before + after) / 2, after - before)
        if best is None or sample[1] < best[1]:
            best = sample
    assert best is not None
    return best


async def last_reservation_ms(redis: Redis, coupon_id: int) -> int:
    """When the reservation that took the coupon's last slot ran, on Redis's clock: the time
    ``issue.lua`` wrote into the stream's last entry (no worker runs, so nothing is trimmed)."""
    entries = await redis.xrevrange(keys.CouponKeys(coupon_id).requests, count=1)
    if not entries:
        raise RuntimeError(f"coupon {coupon_id}: no accepted request in its stream")
    _, fields = entries[0]
    return int(fields.get("t") or fields[b"t"])


def expected_rate(result: WrkResult, status: int, what: str) -> float:
    """Answers per second with the status the scenario measures; refuses a run where they are
    not the vast majority (it measured something else)."""
    expected = result.statuses.get(str(status), 0)
    if result.requests == 0 or expected < 0.95 * result.requests:
        raise RuntimeError(f"feed {what}: expected {status}s, got {result.statuses}")
    return expected / result.seconds


@dataclass
class Measured:
    round_number: int
    condition: str
    scenario: str
    rps: float
    p99_ms: float
    gateway_cpu_us_per_answer: float
    statuses: dict[str, int]


async def _rates(
    running: Stack,
    gateway: Service,
    wrk: Wrk,
    profile: FeedProfile,
    scenarios: dict[str, tuple[str, int]],
    round_number: int,
    condition: str,
) -> list[Measured]:
    """Each scenario once: a warm-up, then the measured run with the gateway's CPU around it."""
    pid = gateway.procs[0].pid  # one process: python -m gateway itself
    measured = []
    for scenario, (path, status) in scenarios.items():
        wrk(running, gateway.url, path, '{"user_id":%d}', profile.warmup, 8)
        cpu_before = cpu_seconds(pid)
        result = wrk(running, gateway.url, path, '{"user_id":%d}', profile.duration,
                     profile.connections)  # fmt: skip
        cpu = cpu_seconds(pid) - cpu_before
        answers = result.statuses.get(str(status), 0)
        measured.append(
            Measured(
                round_number=round_number,
                condition=condition,
                scenario=scenario,
                rps=expected_rate(result, status, f"{scenario} {condition}"),
                p99_ms=result.p99_ms,
                gateway_cpu_us_per_answer=1e6 * cpu / max(answers, 1),
                statuses=result.statuses,
            )
        )
        log(
            f"feed round {round_number} {scenario:16} {condition:7} subscribers"
            f" {measured[-1].rps:10,.0f} req/s  p99 {result.p99_ms:6.1f} ms"
            f"  {measured[-1].gateway_cpu_us_per_answer:5.1f} µs CPU/answer"
        )
    return measured


async def _with_subscribers(
    running: Stack,
    gateway: Service,
    coupon_id: int,
    profile: FeedProfile,
    measure: Callable[[], Any],
) -> tuple[list[Measured], dict[str, Any]]:
    """``measure()`` while a holder keeps ``profile.subscribers`` on ``coupon_id``; what the
    holder and the gateway said about them."""
    pid = gateway.procs[0].pid
    rss_before = rss_kib(pid)
    before = await feed_metrics(gateway.url)
    holder = start_holder(running, gateway, coupon_id, profile.subscribers)
    try:
        ready = await said(holder, READY_TAG, 120)
        held_from = time.perf_counter()
        rss_held = rss_kib(pid)
        counted = await feed_metrics(gateway.url)
        measured = await measure()
    finally:
        running.stop([holder])
    held_seconds = time.perf_counter() - held_from
    report = await said(holder, REPORT_TAG, 5)
    after = await feed_metrics(gateway.url)
    gone_after = await noticed_gone(running, gateway)
    # At least: subscribers of an earlier holder may still be counted (see below), or may
    # have been noticed gone meanwhile.
    if counted["subscribers"] < profile.subscribers:
        raise RuntimeError(f"the gateway counted {counted['subscribers']} subscribers")
    return measured, {
        "open_seconds": ready["open_seconds"],
        "lost": report["lost"],
        "bytes_per_subscriber": report["bytes_received"] / max(report["subscribers"], 1),
        "holder_cpu_seconds": report["cpu_seconds_holding"],
        "holder_cpu_share": report["cpu_seconds_holding"] / held_seconds,
        "gateway_rss_kib_per_subscriber": (rss_held - rss_before) / profile.subscribers,
        "refused": after["refused"] - before["refused"],
        # The gauge right after the holder closed every connection, and how long until 0.
        "still_counted_after_leaving": after["subscribers"],
        "noticed_gone_seconds": gone_after,
    }


async def _drop(
    running: Stack,
    gateway: Service,
    redis: Redis,
    wrk: Wrk,
    profile: FeedProfile,
    round_number: int,
) -> dict[str, Any]:
    """Subscribers on a fresh coupon, which wrk then sells out: sold out to each one told."""
    async with aiohttp.ClientSession() as session:
        coupon_id = await checks.create_coupon(
            session, gateway.url, running.admin_token, total=profile.drop_stock,
            title=f"feed-drop-{round_number}",
        )  # fmt: skip
    holder = start_holder(
        running, gateway, coupon_id, profile.subscribers, within=profile.told_within
    )
    try:
        ready = await said(holder, READY_TAG, 120)
        offset, round_trip = await clock_offset(redis)
        statuses, runs = await _sell_out(running, gateway, redis, wrk, profile, coupon_id)
        report = await said(holder, REPORT_TAG, profile.told_within + 30)
    finally:
        running.stop([holder])
    gone_after = await noticed_gone(running, gateway)
    sold_at = await last_reservation_ms(redis, coupon_id) / 1000
    waits = sorted(1000 * (told + offset - sold_at) for told in report["told_at"])
    drop = {
        "round": round_number,
        "coupon_id": coupon_id,
        "subscribers": report["subscribers"],
        "told": report["told"],
        "lost": report["lost"],
        "open_seconds": ready["open_seconds"],
        "clock_offset_ms": 1000 * offset,
        "clock_round_trip_ms": 1000 * round_trip,
        "sold": profile.drop_stock,
        "sell_runs": runs,
        "statuses": statuses,
        "holder_cpu_seconds": report["cpu_seconds_holding"],
        "noticed_gone_seconds": gone_after,
        **_spread(waits),
    }
    log(
        f"feed round {round_number} drop of {profile.drop_stock:,}: {report['told']:,} of"
        f" {report['subscribers']:,} told sold_out, p50 {drop['p50_ms']} ms, p99"
        f" {drop['p99_ms']} ms, max {drop['max_ms']} ms"
    )
    return drop


async def _sell_out(
    running: Stack, gateway: Service, redis: Redis, wrk: Wrk, profile: FeedProfile, coupon_id: int
) -> tuple[dict[str, int], int]:
    """wrk on the drop until Redis holds its whole stock (wrk's count of 202s may fall short:
    it stops with requests in flight); the statuses it counted and how many runs it took."""
    path = f"/v1/coupons/{coupon_id}/issues"
    statuses: Counter[str] = Counter()
    for run in range(1, SELL_RUNS + 1):
        result = wrk(running, gateway.url, path, '{"user_id":%d}', profile.drop_seconds,
                     profile.connections)  # fmt: skip
        statuses.update(result.statuses)
        reserved = await redis.scard(keys.CouponKeys(coupon_id).users)
        if reserved >= profile.drop_stock:
            return dict(statuses), run
    raise RuntimeError(
        f"feed drop: {reserved} of {profile.drop_stock} sold after {SELL_RUNS} wrk runs of"
        f" {profile.drop_seconds} s ({dict(statuses)})"
    )


def _spread(waits_ms: list[float]) -> dict[str, float | None]:
    """p50 / p99 / max of the sold-out-to-told times, the first, and first to last."""
    if not waits_ms:
        return dict.fromkeys(("first_ms", "p50_ms", "p99_ms", "max_ms", "spread_ms"))
    return {
        "first_ms": round(waits_ms[0], 1),
        "p50_ms": round(percentile(waits_ms, 0.50), 1),
        "p99_ms": round(percentile(waits_ms, 0.99), 1),
        "max_ms": round(waits_ms[-1], 1),
        "spread_ms": round(waits_ms[-1] - waits_ms[0], 1),
    }


def _log_problems(path: Path) -> dict[str, int]:
    """The gateway's warning and error lines, by event: a healthy run has none."""
    found: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
            found[f"{entry['level']}: {entry.get('event')}"] += 1
    return dict(found)


async def feed_phase(running: Stack, profile: FeedProfile, wrk: Wrk) -> dict[str, Any]:
    """Rates with and without subscribers, alternating, then a drop, each round."""
    # The holder holds one descriptor per subscriber, the gateway as many (children inherit).
    burst.raise_open_files_limit(profile.subscribers + 1024)
    log(
        f"live feed: {profile.subscribers:,} subscribers, one gateway process,"
        f" {profile.rounds} round(s)"
    )
    gateway = running.start_gateway(name="feed", shed_max_lag=0, shed_max_age_seconds=0.0)
    pid = gateway.procs[0].pid
    rss_start = rss_kib(pid)
    redis = redis_client.connect(running.redis_url, socket_timeout=10)
    measured: list[Measured] = []
    held: list[dict[str, Any]] = []
    drops: list[dict[str, Any]] = []
    try:
        sold_out = await _sold_out_coupon(running, gateway)
        for round_number in range(1, profile.rounds + 1):
            order = CONDITIONS if round_number % 2 else CONDITIONS[::-1]
            for condition in order:
                runs, holder = await _condition(
                    running, gateway, wrk, profile, round_number, condition, sold_out
                )
                measured += runs
                if holder is not None:
                    held.append({"round": round_number, **holder})
            drops.append(await _drop(running, gateway, redis, wrk, profile, round_number))
        rss_end = rss_kib(pid)
    finally:
        await redis.aclose()
        running.stop(gateway.procs)
    return summarise(
        profile, measured, held, drops,
        gateway={
            "rss_kib_at_start": rss_start, "rss_kib_at_end": rss_end,
            "log_problems": _log_problems(gateway.procs[0].log_path),
        },
    )  # fmt: skip


async def _sold_out_coupon(running: Stack, gateway: Service) -> int:
    """A coupon of 1, sold, then refused once: the gateway knows it is sold out."""
    async with aiohttp.ClientSession() as session:
        coupon_id = await checks.create_coupon(
            session, gateway.url, running.admin_token, total=1, title="feed-sold-out"
        )
        for user in (1, 2):
            async with session.post(
                f"{gateway.url}/v1/coupons/{coupon_id}/issues", json={"user_id": user}
            ) as response:
                await response.read()
    return coupon_id


async def _condition(
    running: Stack,
    gateway: Service,
    wrk: Wrk,
    profile: FeedProfile,
    round_number: int,
    condition: str,
    sold_out: int,
) -> tuple[list[Measured], dict[str, Any] | None]:
    """One side of a round: every scenario, with the subscribers watching the accepting coupon
    or with nobody connected; what the holder saw, on the side with one."""
    async with aiohttp.ClientSession() as session:
        watched, elsewhere = [
            await checks.create_coupon(
                session,
                gateway.url,
                running.admin_token,
                total=ACCEPT_STOCK,
                title=f"feed-{name}-{round_number}-{condition}",
            )
            for name in ("accept", "accept-elsewhere")
        ]
    scenarios = {
        "accept": (f"/v1/coupons/{watched}/issues", 202),
        "sold_out": (f"/v1/coupons/{sold_out}/issues", 409),
    }
    if condition == "with":
        # Subscribers connected but idle meanwhile; with nobody connected it is the accept
        # scenario again, so accept's run without them is its baseline.
        scenarios["accept_elsewhere"] = (f"/v1/coupons/{elsewhere}/issues", 202)

    async def rates() -> list[Measured]:
        return await _rates(running, gateway, wrk, profile, scenarios, round_number, condition)

    if condition == "without":
        return await rates(), None
    return await _with_subscribers(running, gateway, watched, profile, rates)


SCENARIOS = {
    # name: (label, the scenario whose rate without subscribers is its baseline)
    "accept": ("accept, they watch it", "accept"),
    "accept_elsewhere": ("accept, they watch another", "accept"),
    "sold_out": ("sold-out fast path", "sold_out"),
}


def summarise(
    profile: FeedProfile,
    measured: list[Measured],
    held: list[dict[str, Any]],
    drops: list[dict[str, Any]],
    *,
    gateway: dict[str, Any],
) -> dict[str, Any]:
    """Per scenario the median of the rounds' with ÷ without; the drops' medians."""
    return {
        "profile": asdict(profile),
        "rates": {
            name: _ratio(measured, name, baseline) for name, (_, baseline) in SCENARIOS.items()
        },
        "runs": [asdict(m) for m in measured],
        "held": held,
        "drops": drops,
        "told": _told(profile, drops),
        "gateway": gateway,
    }


def _ratio(measured: list[Measured], scenario: str, baseline: str) -> dict[str, Any]:
    """``scenario`` with subscribers ÷ ``baseline`` without, round by round (both lists are
    in round order), and each side's median rate and gateway CPU per answer."""
    sides = {
        "with": [m for m in measured if m.scenario == scenario and m.condition == "with"],
        "without": [m for m in measured if m.scenario == baseline and m.condition == "without"],
    }
    per_round = [
        w.rps / wo.rps for w, wo in zip(sides["with"], sides["without"], strict=True)
    ]
    summary: dict[str, Any] = {"with_vs_without": statistics.median(per_round),
                               "per_round": per_round}  # fmt: skip
    for side, runs in sides.items():
        summary[f"{side}_rps"] = statistics.median(m.rps for m in runs)
        summary[f"{side}_cpu_us_per_answer"] = statistics.median(
            m.gateway_cpu_us_per_answer for m in runs
        )
    return summary


def _told(profile: FeedProfile, drops: list[dict[str, Any]]) -> dict[str, Any]:
    """The drops' medians of p50 / p99 / max, and the worst max."""
    told = [d for d in drops if d["p99_ms"] is not None]

    def median_of(name: str) -> float | None:
        return statistics.median(d[name] for d in told) if told else None

    return {
        "subscribers": profile.subscribers,
        "every_one_told": all(
            d["told"] == d["subscribers"] == profile.subscribers for d in drops
        ),
        **{
            name: median_of(name)
            for name in ("first_ms", "p50_ms", "p99_ms", "max_ms", "spread_ms")
        },
        "worst_max_ms": max((d["max_ms"] for d in told), default=None),
    }


def goals(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's goals: both rates hold with the subscribers watching the drop, and they
    hear of the sell-out soon enough."""
    judged = {
        name: {
            "goal": goal,
            "value": data["rates"][scenario]["with_vs_without"],
            "met": data["rates"][scenario]["with_vs_without"] >= goal,
        }
        for (name, goal), scenario in zip(GOALS.items(), ("accept", "sold_out"), strict=True)
    }
    p99 = data["told"]["p99_ms"]
    judged["feed_told_p99_ms"] = {
        "goal": TOLD_P99_GOAL_MS,
        "value": p99,
        "met": p99 is not None and data["told"]["every_one_told"] and p99 <= TOLD_P99_GOAL_MS,
    }
    return judged


def table_lines(data: dict[str, Any], judged: dict[str, dict[str, Any]]) -> list[str]:
    """The feed's rows of the bench's table."""
    p = data["profile"]
    goal_of = {"accept": "feed_accept_with_vs_without", "sold_out": "feed_sold_out_with_vs_without"}

    def verdict(name: str, sign: str, unit: str = "") -> str:
        g = judged[name]
        return f"{sign} {g['goal']:g}{unit} {'met' if g['met'] else 'NOT met'}"

    lines = [
        f"live feed: {p['subscribers']:,} subscribers on one gateway process; rates without ->"
        f" with them, x = median of {p['rounds']} same-round ratios; CPU: the gateway's per answer",
    ]
    for name, (label, _) in SCENARIOS.items():
        r = data["rates"][name]
        goal = verdict(goal_of[name], ">=") if name in goal_of else "(note, no goal)"
        lines.append(
            f"  {label:26} {r['without_rps']:7,.0f} -> {r['with_rps']:7,.0f} req/s"
            f"  x{r['with_vs_without']:.2f} {goal}; CPU {r['without_cpu_us_per_answer']:.0f}"
            f" -> {r['with_cpu_us_per_answer']:.0f} µs"
        )
    lines += _told_lines(data, verdict("feed_told_p99_ms", "<=", " ms"))
    held = data["held"]
    lines.append(
        f"  holders: {sum(h['lost'] for h in held)} lost, {sum(h['refused'] for h in held):.0f}"
        f" refused, holder CPU at most {100 * max(h['holder_cpu_share'] for h in held):.0f} %"
        f" of a core; gateway RSS +{held[0]['gateway_rss_kib_per_subscriber']:.1f} KiB per"
        f" subscriber (first holder), {data['gateway']['rss_kib_at_end'] / 1024:.0f} MiB at the"
        " end"
    )
    gone = [h["noticed_gone_seconds"] for h in held] + [
        d["noticed_gone_seconds"] for d in data["drops"]
    ]
    lines.append(
        f"  after a holder left, the gateway still counted its subscribers for"
        f" {min(gone):.1f}-{max(gone):.1f} s (until its sweep found them gone; the bench waits)"
    )
    problems = data["gateway"]["log_problems"]
    lines.append(f"  gateway log warnings/errors: {problems or 'none'}")
    return lines


def _told_lines(data: dict[str, Any], verdict: str) -> list[str]:
    p, told, drops = data["profile"], data["told"], data["drops"]
    if told["p99_ms"] is None:
        return ["  last reservation -> told sold_out: nobody was told"]
    every = "every one" if told["every_one_told"] else "NOT every one"
    return [
        f"  last reservation -> each told sold_out ({every} of {told['subscribers']:,},"
        f" {len(drops)} drops of {p['drop_stock']:,}): p50 {told['p50_ms']:.0f} ms, p99"
        f" {told['p99_ms']:.0f} ms, max {told['max_ms']:.0f} ms; p99 {verdict}",
        f"  first told {told['first_ms']:.0f} ms, first to last {told['spread_ms']:.0f} ms;"
        " per drop p99/max ms: "
        + ", ".join(f"{d['p99_ms']:.0f}/{d['max_ms']:.0f}" for d in drops)
        + f"; answers in each drop's {p['drop_seconds']} s wrk runs: "
        + ", ".join(
            f"{sum(d['statuses'].values()):,} in {d['sell_runs']}" for d in drops
        )
        + f"; clock offset Redis - here {drops[0]['clock_offset_ms']:+.2f} ms",
    ]


if __name__ == "__main__":
    main()
