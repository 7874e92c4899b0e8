"""The error hierarchy every HTTP route raises. Each class carries its HTTP status, its
machine-readable ``code`` (the seed's names) and the seed's Korean message as class data; one
middleware renders them as ``application/problem+json``."""

from __future__ import annotations

from typing import ClassVar


class AppError(Exception):
    """Base of every error a client may see."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "FAIL_COUPON_ISSUE_REQUEST"
    title: ClassVar[str] = "Coupon issue request failed"
    # The seed's ErrorCode.message, returned as ``comment`` by the seed-compatible routes.
    seed_message: ClassVar[str] = "쿠폰 발급 요청에 실패했습니다"
    retry_after: ClassVar[int | None] = None
    # The ``coupon_issue_requests_total{outcome}`` an issue request that ends in this error
    # counts as (shared/metrics.py lists them all).
    outcome: ClassVar[str] = "unavailable"
    # Close the connection after the answer (the request left the stream in an unknown state).
    close_connection: ClassVar[bool] = False

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title

    def headers(self) -> dict[str, str] | None:
        """Extra response headers this error asks for (``Retry-After``, ``WWW-Authenticate``)."""
        if self.retry_after is None:
            return None
        return {"Retry-After": str(self.retry_after)}


class InvalidRequest(AppError):
    status = 400
    code = "INVALID_REQUEST"
    outcome = "invalid"
    title = "Malformed request"


class BodyTimeout(InvalidRequest):
    """The body did not arrive within ``COUPON_BODY_READ_TIMEOUT_SECONDS``."""

    status = 408
    title = "The request body did not arrive in time"
    close_connection = True


class Unauthorized(AppError):
    """No credentials, or credentials that do not verify. ``challenge`` is the RFC 6750
    ``WWW-Authenticate`` value that tells the client which scheme (and which error) applies."""

    status = 401
    code = "UNAUTHORIZED"
    outcome = "unauthorized"
    title = "Missing or invalid credentials"

    def __init__(self, detail: str | None = None, *, challenge: str = "Bearer") -> None:
        super().__init__(detail)
        self.challenge = challenge

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": self.challenge}


class Forbidden(AppError):
    """Authenticated, but not allowed to act for the user the request names."""

    status = 403
    code = "FORBIDDEN"
    outcome = "forbidden"
    title = "Not allowed to act for this user"


class RateLimited(AppError):
    """Too many requests from one client address or for one user; nothing was reserved."""

    status = 429
    code = "RATE_LIMITED"
    outcome = "rate_limited"
    title = "Too many requests"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after_seconds = max(1, retry_after)

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after_seconds)}


class Rejection(AppError):
    """A definite business "no" for an issue request: nothing was reserved, and retrying the
    same request will not change the answer until the coupon itself changes."""


class CouponNotFound(Rejection):
    status = 404
    code = "COUPON_NOT_EXIST"
    outcome = "not_found"
    title = "Coupon does not exist"
    seed_message = "존재하지 않는 쿠폰입니다."


class IssueNotFound(AppError):
    status = 404
    code = "ISSUE_NOT_FOUND"
    title = "This user never requested this coupon"


class DuplicatedIssue(Rejection):
    status = 409
    code = "DUPLICATED_COUPON_ISSUE"
    outcome = "duplicate"
    title = "This user already holds this coupon"
    seed_message = "이미 발급된 쿠폰입니다."


class SoldOut(Rejection):
    status = 409
    code = "INVALID_COUPON_ISSUE_QUANTITY"
    outcome = "sold_out"
    title = "The coupon is sold out"
    seed_message = "쿠폰 발급 수량이 유효하지 않습니다."


class OutsideWindow(Rejection):
    status = 409
    code = "INVALID_COUPON_ISSUE_DATE"
    outcome = "outside_window"
    title = "The coupon cannot be issued at this time"
    seed_message = "쿠폰 발급 기간이 유효하지 않습니다."


class CouponPaused(Rejection):
    status = 409
    code = "COUPON_PAUSED"
    outcome = "paused"
    title = "Issuing this coupon is paused"
    seed_message = "쿠폰 발급 기간이 유효하지 않습니다."


class Unavailable(AppError):
    """The service cannot accept safely right now; the client may retry."""

    status = 503
    code = "FAIL_COUPON_ISSUE_REQUEST"
    title = "The service cannot accept requests right now"
    retry_after = 1


class Unconfirmed(Unavailable):
    """Reserved on the Redis primary, but fewer replicas than ``COUPON_REDIS_MIN_REPLICAS``
    acknowledged it in time: a failover now could lose it, so it gets no 202. The outcome is
    unknown; the status route tells it once settled."""

    title = "The request was not confirmed by a Redis replica in time; the outcome is unknown"
    outcome = "unconfirmed"


class Overloaded(Unavailable):
    """This gateway process's reservation queue stands (requests wait past the target);
    nothing was reserved."""

    title = "Requests wait too long for a reservation"
    # Shedding that works as intended is not an outage: its own outcome, its own alert.
    outcome = "shed"


class PipelineBehind(Unavailable):
    """The workers are too far behind on this coupon; nothing was reserved."""

    title = "Issuing is catching up"
    retry_after = 2
    outcome = "shed"


class FeedFull(Unavailable):
    """This gateway process holds ``COUPON_MAX_SUBSCRIBERS`` live feed clients already."""

    code = "FEED_FULL"
    title = "This gateway holds as many live feed subscribers as it may"
    retry_after = 5


class RedisStateLost(Unavailable):
    """Redis came back without the service's state; selling now could sell the stock twice."""

    title = "Coupon state is being restored"


class IdempotencyKeyReused(AppError):
    """A coupon creation names an Idempotency-Key that an earlier creation used with another
    body: replaying the first one's answer would hide the difference."""

    status = 422
    code = "IDEMPOTENCY_KEY_REUSED"
    title = "The Idempotency-Key was used with another body"
    outcome = "invalid"


class Conflict(AppError):
    """An admin change that would break a promise already made (e.g. stock below the accepted)."""

    status = 409
    code = "CONFLICT"
    title = "The change conflicts with the coupon's current state"
