"""The issue decision, shared by the native route and the seed-compatible ones."""

from __future__ import annotations

import time

from redis.exceptions import RedisClusterException, RedisError

from gateway.backpressure import PipelineHealth, WaitAdmission
from gateway.coalescer import Coalescer, NotReplicated, StateMissing
from gateway.snapshots import SnapshotCache
from shared.errors import (
    AppError,
    CouponNotFound,
    CouponPaused,
    DuplicatedIssue,
    OutsideWindow,
    SoldOut,
    Unavailable,
    Unconfirmed,
)
from shared.model import Coupon
from shared.redis.scripts import BatchOutcome, IssueResult, Reservation

# The local window pre-check only rejects requests that are outside the window by more than
# this, judged by the local clock corrected by the offset to Redis time. Everything closer is
# left to the Lua script, which reads Redis TIME, so the window is always Redis's.
WINDOW_MARGIN_MS = 1000

# What each script result answers: the error, and its detail (formatted only when raised).
_REJECTIONS: dict[IssueResult, tuple[type[AppError], str]] = {
    IssueResult.DUPLICATE: (DuplicatedIssue, "user {user} already requested coupon {coupon}"),
    IssueResult.SOLD_OUT: (SoldOut, "coupon {coupon} is sold out"),
    IssueResult.NOT_STARTED: (OutsideWindow, "issuing coupon {coupon} has not started yet"),
    IssueResult.ENDED: (OutsideWindow, "issuing coupon {coupon} has ended"),
    IssueResult.PAUSED: (CouponPaused, "issuing coupon {coupon} is paused"),
}


class Issuer:
    """Validates against the cached snapshot, sheds load, then reserves through the coalescer.

    Every refusal (rejection or shedding) happens before the reservation: a 503 from here
    never leaves a slot taken or a request queued.
    """

    def __init__(
        self,
        snapshots: SnapshotCache,
        coalescer: Coalescer,
        *,
        health: PipelineHealth | None = None,
        admission: WaitAdmission | None = None,
    ) -> None:
        self._snapshots = snapshots
        self._coalescer = coalescer
        self._health = health
        self._admission = admission
        coalescer.on_outcome.append(self._note_outcome)

    async def issue(self, coupon_id: int, user_id: int) -> Reservation:
        """Reserve a coupon for a user, or raise the :class:`AppError` that says why not."""
        try:
            coupon = await self._snapshots.get(coupon_id)
        except (RedisError, OSError, TimeoutError):
            raise Unavailable("Redis is unreachable") from None
        if coupon is None:
            raise CouponNotFound(f"coupon {coupon_id} does not exist")
        self._precheck(coupon)
        if self._health is not None:
            self._health.check(coupon_id)
        if self._admission is not None:
            self._admission.check()
        try:
            reservation = await self._coalescer.reserve(coupon_id, user_id)
        except StateMissing:
            self._snapshots.invalidate(coupon_id)
            raise Unavailable(f"coupon {coupon_id} has no state in Redis") from None
        except NotReplicated:
            raise Unconfirmed(
                f"coupon {coupon_id} was reserved for user {user_id} on the Redis primary, but"
                " no replica confirmed it in time; the outcome is unknown: GET"
                f" /v1/coupons/{coupon_id}/issues/{user_id} tells it once settled"
            ) from None
        except (RedisError, RedisClusterException, OSError, TimeoutError):
            raise Unavailable("Redis did not answer in time; the outcome is unknown") from None
        if reservation.result is IssueResult.ACCEPTED:
            return reservation
        error, detail = _REJECTIONS[reservation.result]
        raise error(detail.format(coupon=coupon_id, user=user_id))

    def _precheck(self, coupon: Coupon) -> None:
        """Answer without Redis when the snapshot already settles it."""
        if coupon.paused:
            raise CouponPaused(f"issuing coupon {coupon.id} is paused")
        offset = self._coalescer.redis_clock_offset_ms
        if offset is not None:
            now_ms = int(time.time() * 1000) + offset
            if (
                now_ms < coupon.start_ms - WINDOW_MARGIN_MS
                or now_ms >= coupon.end_ms + WINDOW_MARGIN_MS
            ):
                raise OutsideWindow(f"coupon {coupon.id} is outside its issue window")
        if self._snapshots.is_sold_out(coupon.id):
            raise SoldOut(f"coupon {coupon.id} is sold out")

    def _note_outcome(self, coupon_id: int, outcome: BatchOutcome) -> None:
        if outcome.remaining == 0:
            self._snapshots.mark_sold_out(coupon_id)
