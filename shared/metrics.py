"""Every Prometheus metric of the service, defined once."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Gateway
ISSUE_REQUESTS = Counter(
    "coupon_issue_requests_total",
    "Issue requests by outcome.",
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
SNAPSHOT_LOOKUPS = Counter(
    "coupon_snapshot_lookups_total",
    "In-process coupon snapshot cache lookups.",
    ["result"],
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
    "Latency of one batch transaction, BEGIN to COMMIT.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
WORKER_MYSQL_UP = Gauge(
    "coupon_worker_mysql_up",
    "1 when the worker's last MySQL transaction succeeded.",
)
