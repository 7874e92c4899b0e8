"""The admin request bodies, validated: a new coupon and a change to one.

The admin API and couponctl both build these, so a coupon made either way passes the same
checks. Every failure raises :class:`~shared.errors.InvalidRequest` (a 400) with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from shared.errors import InvalidRequest
from shared.ids import MAX_INT32
from shared.model import EARLIEST, LATEST, Coupon, check_window, iso

# The longest title a coupon may have (characters); gateway/openapi.json says the same.
TITLE_MAX_LENGTH = 255


def _int_field(body: dict[str, Any], name: str, *, low: int, high: int, default: int | None) -> int:
    value = body.get(name, default)
    if value is None or isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}")
    return int(value)


def _datetime_field(body: dict[str, Any], name: str) -> datetime:
    value = body.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be an ISO-8601 timestamp with an offset")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{name} is not an ISO-8601 timestamp: {value!r}") from None
    if moment.tzinfo is None:
        raise InvalidRequest(f"{name} needs a UTC offset, e.g. 2026-11-25T13:00:00+09:00")
    try:
        utc = moment.astimezone(UTC)
    except OverflowError:  # an offset that pushes year 1 or 9999 out of range
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise InvalidRequest(f"{name} must lie between {EARLIEST.year} and {LATEST.year}")
    return utc


def _title(body: dict[str, Any]) -> str:
    title = body.get("title")
    if not isinstance(title, str) or not title.strip() or len(title) > TITLE_MAX_LENGTH:
        raise InvalidRequest(
            f"title must be a non-empty string of at most {TITLE_MAX_LENGTH} characters"
        )
    return title.strip()


@dataclass(frozen=True, slots=True)
class NewCoupon:
    """A validated request to create a coupon."""

    title: str
    total_quantity: int | None
    discount_amount: int
    min_available_amount: int
    date_issue_start: datetime
    date_issue_end: datetime

    @classmethod
    def from_json(cls, body: Any) -> NewCoupon:
        """Validate an admin request body; raises :class:`InvalidRequest` with the reason."""
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        title = _title(body)
        total: int | None = None
        if body.get("total_quantity") is not None:
            total = _int_field(body, "total_quantity", low=0, high=MAX_INT32, default=None)
        start = _datetime_field(body, "date_issue_start")
        end = _datetime_field(body, "date_issue_end")
        check_window(start, end)
        return cls(
            title=title,
            total_quantity=total,
            discount_amount=_int_field(body, "discount_amount", low=0, high=MAX_INT32, default=0),
            min_available_amount=_int_field(
                body, "min_available_amount", low=0, high=MAX_INT32, default=0
            ),
            date_issue_start=start,
            date_issue_end=end,
        )

    def fingerprint(self) -> str:
        """What identifies this request under an Idempotency-Key: the validated values (so
        ``"+09:00"`` and the same instant in UTC, or a default left out and given, are one
        request), hashed."""
        values = {
            "title": self.title,
            "total_quantity": self.total_quantity,
            "discount_amount": self.discount_amount,
            "min_available_amount": self.min_available_amount,
            "date_issue_start": iso(self.date_issue_start),
            "date_issue_end": iso(self.date_issue_end),
        }
        return hashlib.sha256(orjson.dumps(values, option=orjson.OPT_SORT_KEYS)).hexdigest()


IDEMPOTENCY_KEY_MAX_LENGTH = 255


def idempotency_key(raw: str) -> str:
    """An ``Idempotency-Key``: 1 to 255 visible ASCII characters (a UUID is the usual choice)."""
    if not 1 <= len(raw) <= IDEMPOTENCY_KEY_MAX_LENGTH or not all(
        "!" <= char <= "~" for char in raw
    ):
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} visible ASCII characters"
        )
    return raw


@dataclass(frozen=True, slots=True)
class CouponChange:
    """A validated ``PATCH``: only the fields present change. ``total_quantity`` may be null
    (unlimited); ``paused`` pauses or resumes issuing."""

    changes: dict[str, Any]

    FIELDS = frozenset({"title", "total_quantity", "date_issue_start", "date_issue_end", "paused"})

    @classmethod
    def from_json(cls, body: Any) -> CouponChange:
        if not isinstance(body, dict) or not body:
            raise InvalidRequest(
                f"the body must be a JSON object with some of {sorted(cls.FIELDS)}"
            )
        unknown = set(body) - cls.FIELDS
        if unknown:
            raise InvalidRequest(
                f"cannot change {sorted(unknown)}; changeable: {sorted(cls.FIELDS)}"
            )
        changes: dict[str, Any] = {}
        if "title" in body:
            changes["title"] = _title(body)
        if "total_quantity" in body:
            changes["total_quantity"] = (
                None
                if body["total_quantity"] is None
                else _int_field(body, "total_quantity", low=0, high=MAX_INT32, default=None)
            )
        for name in ("date_issue_start", "date_issue_end"):
            if name in body:
                changes[name] = _datetime_field(body, name)
        if "paused" in body:
            if not isinstance(body["paused"], bool):
                raise InvalidRequest("paused must be true or false")
            changes["paused"] = body["paused"]
        return cls(changes)

    def apply(self, coupon: Coupon) -> Coupon:
        updated = dataclasses.replace(coupon, **self.changes)
        check_window(updated.date_issue_start, updated.date_issue_end)
        return updated
