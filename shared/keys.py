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

STATE_MARKER = "coupons:state"
"""STRING written once Redis holds the service's state. If Redis comes back empty (state lost),
the marker is gone too, and the gateway answers 503 instead of "no such coupon" (or worse,
selling the stock a second time) until ``couponctl rebuild`` restores the state from MySQL."""


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
        """SET: users whose row is committed in MySQL (for the status route)."""
        return f"{self.tag}:issued"

    @property
    def failed(self) -> str:
        """SET: users whose last accepted request was dead-lettered."""
        return f"{self.tag}:failed"

    def all(self) -> tuple[str, ...]:
        return (self.meta, self.users, self.requests, self.dead, self.issued, self.failed)
