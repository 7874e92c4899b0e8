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

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title


class InvalidRequest(AppError):
    status = 400
    code = "INVALID_REQUEST"
    title = "Malformed request"


class Unauthorized(AppError):
    status = 401
    code = "UNAUTHORIZED"
    title = "Missing or invalid credentials"


class Rejection(AppError):
    """A definite business "no" for an issue request: nothing was reserved, and retrying the
    same request will not change the answer until the coupon itself changes."""


class CouponNotFound(Rejection):
    status = 404
    code = "COUPON_NOT_EXIST"
    title = "Coupon does not exist"
    seed_message = "존재하지 않는 쿠폰입니다."


class IssueNotFound(AppError):
    status = 404
    code = "ISSUE_NOT_FOUND"
    title = "This user never requested this coupon"


class DuplicatedIssue(Rejection):
    status = 409
    code = "DUPLICATED_COUPON_ISSUE"
    title = "This user already holds this coupon"
    seed_message = "이미 발급된 쿠폰입니다."


class SoldOut(Rejection):
    status = 409
    code = "INVALID_COUPON_ISSUE_QUANTITY"
    title = "The coupon is sold out"
    seed_message = "쿠폰 발급 수량이 유효하지 않습니다."


class OutsideWindow(Rejection):
    status = 409
    code = "INVALID_COUPON_ISSUE_DATE"
    title = "The coupon cannot be issued at this time"
    seed_message = "쿠폰 발급 기간이 유효하지 않습니다."


class CouponPaused(Rejection):
    status = 409
    code = "COUPON_PAUSED"
    title = "Issuing this coupon is paused"
    seed_message = "쿠폰 발급 기간이 유효하지 않습니다."


class Unavailable(AppError):
    """The service cannot accept safely right now; the client may retry."""

    status = 503
    code = "FAIL_COUPON_ISSUE_REQUEST"
    title = "The service cannot accept requests right now"
    retry_after = 1


class Conflict(AppError):
    """An admin change that would break a promise already made (e.g. stock below the accepted)."""

    status = 409
    code = "CONFLICT"
    title = "The change conflicts with the coupon's current state"
