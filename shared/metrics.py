"""Every Prometheus metric of the service, defined once, and how ``/metrics`` is rendered.

Label values come from closed sets (outcomes, results, route templates, status classes) or, for
the per-coupon stream gauges, from at most :data:`MAX_COUPON_SERIES` coupons, so the number of
series stays bounded whatever the traffic.

Several gateway processes share one port (``reuse_port``); a scrape lands on any one of them.
With ``PROMETHEUS_MULTIPROC_DIR`` set (whoever starts the processes sets it and empties it at
every start: ``scripts/run``, the container's supervisord), every process writes its values to
memory-mapped files in that folder and :func:`exposition` sums them, so any scrape reports the
totals of all processes. The variable must be in the environment before this module is first
imported: prometheus_client picks its value store then.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

if os.environ.get(MULTIPROC_ENV):
    # The metrics below open their files in this folder as they are created; whoever starts
    # the processes empties it once per start, this only makes sure it exists.
    os.makedirs(os.environ[MULTIPROC_ENV], exist_ok=True)

ISSUE_OUTCOMES = (
    "accepted",
    "duplicate",
    "sold_out",
    "outside_window",
    "not_found",
    "invalid",
    "unavailable",
    "shed",
    "unconfirmed",
    "rate_limited",
    "paused",
    "unauthorized",
    "forbidden",
)
"""Every value of ``coupon_issue_requests_total{outcome}``; each issue request counts once."""

WORKER_RESULTS = (
    "committed",
    "already_issued",
    "dead_lettered",
    "reclaimed",
    "malformed",
    "failed",
)
"""Every value of ``coupon_worker_entries_total{result}``."""

MAX_COUPON_SERIES = 50
"""Most coupons that get their own ``coupon`` label on the stream gauges; the rest are summed
under ``coupon="other"``."""

# Gateway
ISSUE_REQUESTS = Counter(
    "coupon_issue_requests_total",
    "Issue requests (native and seed-compatible routes) by outcome.",
    ["outcome"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "coupon_http_request_duration_seconds",
    "HTTP request latency by route and status class.",
    ["route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
RESERVE_SECONDS = Histogram(
    "coupon_reserve_script_duration_seconds",
    "Latency of one coalesced reservation script call.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
)
RESERVE_BATCH_SIZE = Histogram(
    "coupon_reserve_batch_size",
    "Requests coalesced into one reservation script call.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
REPLICA_ACKS_MISSING = Counter(
    "coupon_replica_acks_missing_total",
    "Writes that fewer than COUPON_REDIS_MIN_REPLICAS replicas acknowledged in time (WAIT), by"
    " path: reserve (the batch's accepted requests got 503 outcome unknown) or worker (the"
    " entries were held back from MySQL until a replica had them).",
    ["path"],
)
SNAPSHOT_LOOKUPS = Counter(
    "coupon_snapshot_lookups_total",
    "In-process coupon snapshot cache lookups.",
    ["result"],
)
FEED_EVENTS = (
    "snapshot", "remaining", "sold_out", "reopened", "paused", "resumed", "started", "closed"
)  # fmt: skip
FEED_SUBSCRIBERS = Gauge(
    "coupon_feed_subscribers",
    "Clients connected to the live feed (GET /v1/coupons/{id}/events), all coupons.",
    multiprocess_mode="livesum",
)
FEED_EVENTS_SENT = Counter(
    "coupon_feed_events_total",
    "Live feed events by name, counted once per coupon and gateway process (not per"
    " subscriber; coupon_feed_subscribers says how many heard each).",
    ["event"],
)
FEED_REFUSED = Counter(
    "coupon_feed_refused_total",
    "Live feed subscriptions refused or ended by the gateway: full (COUPON_MAX_SUBSCRIBERS"
    " reached, 503) or slow (a client that stopped reading, disconnected).",
    ["reason"],
)

# Worker
WORKER_ENTRIES = Counter(
    "coupon_worker_entries_total",
    "Stream entries handled by workers, by result.",
    ["result"],
)
WORKER_BATCH_SIZE = Histogram(
    "coupon_worker_batch_size",
    "Entries per MySQL transaction.",
    buckets=(1, 10, 50, 100, 250, 500, 1000),
)
WORKER_COMMIT_SECONDS = Histogram(
    "coupon_worker_commit_duration_seconds",
    "Latency of one batch transaction, first statement to COMMIT.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
WORKER_TIME_TO_ISSUE_SECONDS = Histogram(
    "coupon_worker_time_to_issue_seconds",
    "From a request's acceptance (the Redis clock, in its stream entry) to the commit of its"
    " row (the worker's clock): how long a winner waits for the coupon to appear.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
# Gauges name a multiprocess mode so that, should a worker ever run with the multiprocess
# folder set, a scrape shows one value instead of one series per process id.
WORKER_MYSQL_UP = Gauge(
    "coupon_worker_mysql_up",
    "1 when the worker's last MySQL transaction succeeded.",
    multiprocess_mode="livemin",
)

# Stream monitor (run by every worker; the values are the same from each, so dashboards take
# the max over instances).
STREAM_LAG = Gauge(
    "coupon_stream_lag",
    "Accepted requests not yet delivered to any worker, per coupon.",
    ["coupon"],
    multiprocess_mode="livemax",
)
STREAM_PENDING = Gauge(
    "coupon_stream_pending",
    "Requests delivered to a worker but not yet acknowledged (committed), per coupon.",
    ["coupon"],
    multiprocess_mode="livemax",
)
STREAM_OLDEST_PENDING_SECONDS = Gauge(
    "coupon_stream_oldest_pending_age_seconds",
    "Age of the oldest accepted request not yet committed and acknowledged, per coupon.",
    ["coupon"],
    multiprocess_mode="livemax",
)
COUPON_REMAINING = Gauge(
    "coupon_remaining",
    "Stock left to reserve, per coupon (coupons with unlimited stock are not reported).",
    ["coupon"],
    multiprocess_mode="livemax",
)
REQUESTS_UNACCOUNTED = Gauge(
    "coupon_requests_unaccounted",
    "Accepted requests that are neither issued, pending nor dead-lettered, per coupon: accepted"
    " - issued - pending - dead-lettered - correction (0 when every one is accounted for; below"
    " 0: counted twice). Not reported where Redis cannot count them (before 7.0).",
    ["coupon"],
    multiprocess_mode="livemax",
)
GATEWAY_MYSQL_UP = Gauge(
    "coupon_gateway_mysql_up",
    "1 when the gateway's last MySQL check answered (the sync route and the admin API need"
    " MySQL; acceptance does not).",
    multiprocess_mode="livemin",
)
REDIS_USED_MEMORY_BYTES = Gauge(
    "coupon_redis_used_memory_bytes",
    "Memory Redis uses (INFO memory used_memory; the largest node of a cluster).",
    multiprocess_mode="livemax",
)
REDIS_MAXMEMORY_BYTES = Gauge(
    "coupon_redis_maxmemory_bytes",
    "Redis's maxmemory (0: no limit). Under noeviction a full Redis refuses every write: every"
    " reservation is then a 503.",
    multiprocess_mode="livemax",
)
STREAM_MONITOR_UP = Gauge(
    "coupon_stream_monitor_up",
    "1 when the worker's last stream measurement succeeded.",
    multiprocess_mode="livemin",
)


def init_gateway_series() -> None:
    """Create every gateway label series at 0, so a rate() sees the first increment."""
    for outcome in ISSUE_OUTCOMES:
        ISSUE_REQUESTS.labels(outcome)
    for result in ("hit", "miss"):
        SNAPSHOT_LOOKUPS.labels(result)
    REPLICA_ACKS_MISSING.labels("reserve")
    for event in FEED_EVENTS:
        FEED_EVENTS_SENT.labels(event)
    for reason in ("full", "slow"):
        FEED_REFUSED.labels(reason)


def init_worker_series() -> None:
    """Create every worker label series at 0."""
    for result in WORKER_RESULTS:
        WORKER_ENTRIES.labels(result)
    REPLICA_ACKS_MISSING.labels("worker")


def multiprocess_dir() -> str | None:
    """The shared metrics folder of a multi-process gateway, or None in single-process mode."""
    return os.environ.get(MULTIPROC_ENV) or None


def exposition() -> tuple[bytes, str]:
    """The text exposition (body, content type): every process's totals in multiprocess mode,
    this process's own registry otherwise."""
    if multiprocess_dir() is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    # A fresh registry per scrape: the collector reads the files of every process, the living
    # and the dead (a restarted process's counts are part of what clients saw).
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def issue_outcome_totals() -> dict[str, float]:
    """Issue requests answered so far by outcome: this process's, or in multiprocess mode every
    gateway process's on this host (the files are read; call it off the event loop)."""
    if multiprocess_dir() is None:
        families = ISSUE_REQUESTS.collect()
    else:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        families = list(registry.collect())
    totals: dict[str, float] = {}
    for family in families:
        if family.name != "coupon_issue_requests":
            continue
        for sample in family.samples:
            if sample.name == "coupon_issue_requests_total":
                outcome = sample.labels["outcome"]
                totals[outcome] = totals.get(outcome, 0.0) + sample.value
    return totals


def mark_process_dead(pid: int) -> None:
    """Drop a finished process's live gauges (its counters stay in the totals)."""
    if multiprocess_dir() is not None:
        _multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def forget_dead_processes() -> list[int]:
    """Drop the live gauges of every process that left files in the shared folder and no longer
    runs: a sibling killed outright (SIGKILL, out of memory) had no chance to drop its own, and
    the supervisor that restarts it does not know about metrics. Returns those pids."""
    folder = multiprocess_dir()
    if folder is None:
        return []
    pids = set()
    for path in Path(folder).glob("*_*.db"):
        suffix = path.stem.rpartition("_")[2]  # counter_1234.db, gauge_livesum_1234.db
        if suffix.isdigit():
            pids.add(int(suffix))
    dead = sorted(pid for pid in pids if not _running(pid))
    for pid in dead:
        mark_process_dead(pid)
    return dead


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
