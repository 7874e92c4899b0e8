"""Redis key names. Every key of one coupon carries the hash tag ``{coupon:ID}`` so that one Lua
call may touch them all, on a single Redis or on a Redis Cluster shard."""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "issuers"
"""The consumer group that stream workers read every request stream with."""

ACTIVE_COUPONS = "coupons:active"
"""SET of coupon ids whose streams workers must read."""

CHANGES_CHANNEL = "coupons:changed"
"""Pub/sub channel; the message is a coupon id whose snapshot or stock changed."""

SOLD_OUT_CHANNEL = "coupons:sold_out"
"""Pub/sub channel; ``issue.lua`` publishes a coupon's id when a call takes its last stock
slot, so every gateway's live feed says ``sold_out`` at once instead of at its next poll."""

STATE_MARKER = "coupons:state"
"""STRING written once Redis holds the service's state. If Redis comes back empty (state lost),
the marker is gone too, and the gateway answers 503 instead of "no such coupon" (or worse,
selling the stock a second time) until ``couponctl rebuild`` restores the state from MySQL."""

WORKERS = "coupons:workers"
"""ZSET of stream workers alive: member = the worker's name (``COUPON_WORKER_NAME``), score =
the Redis server time (ms) of its last heartbeat. A worker refreshes its member every few
seconds while its loop turns (``heartbeat.lua``, which also drops members silent for an hour)
and removes it when it stops cleanly; ``couponctl preflight`` counts the fresh members, since a
consumer group shows no consumer before the first request reaches it."""


@dataclass(frozen=True, slots=True)
class CouponKeys:
    """The Redis keys of one coupon."""

    coupon_id: int

    @property
    def tag(self) -> str:
        return f"{{coupon:{self.coupon_id}}}"

    @property
    def meta(self) -> str:
        """HASH: the coupon snapshot the Lua script judges by (window, total, paused)."""
        return f"{self.tag}:meta"

    @property
    def users(self) -> str:
        """SET: users holding a stock slot (accepted and not released)."""
        return f"{self.tag}:users"

    @property
    def requests(self) -> str:
        """STREAM: accepted requests, read by the ``issuers`` group."""
        return f"{self.tag}:requests"

    @property
    def dead(self) -> str:
        """STREAM: dead-lettered requests."""
        return f"{self.tag}:dead"

    @property
    def issued(self) -> str:
        """SET: users whose row is committed in MySQL and whose request was acknowledged (the
        worker marks and XACKs in one MULTI), for the status route and the balance of
        accepted requests (``coupon_requests_unaccounted``, :mod:`stream_worker.monitor`)."""
        return f"{self.tag}:issued"

    @property
    def sync_issued(self) -> str:
        """SET: users whose row the synchronous route (``POST /v1/issue``) committed itself,
        shown issued at once by the status route. Their :attr:`issued` mark comes with the
        worker's acknowledgement of the entry, as everyone's, so that :attr:`issued` never
        counts a request that is still pending."""
        return f"{self.tag}:sync_issued"

    @property
    def correction(self) -> str:
        """STRING, an integer: accepted requests that the balance accepted = issued + pending +
        dead-lettered cannot place by itself (:mod:`stream_worker.monitor`). Each request
        ``couponctl reconcile --repair`` re-queues as a new entry adds 1 (its lost original
        stays in the stream, settled without a row); each issued mark rebuild or reconcile
        restores for a row with no request in the stream (the stream was lost) takes 1 off."""
        return f"{self.tag}:correction"

    @property
    def failed(self) -> str:
        """SET: users whose last accepted request was dead-lettered."""
        return f"{self.tag}:failed"

    def all(self) -> tuple[str, ...]:
        return (
            self.meta, self.users, self.requests, self.dead, self.issued, self.failed,
            self.sync_issued, self.correction,
        )  # fmt: skip
