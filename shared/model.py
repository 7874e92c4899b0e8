"""A coupon: the model, and the forms it takes in each store.

MySQL is the system of record (:meth:`Coupon.from_row`); Redis holds the snapshot that the
reservation script judges by (:meth:`Coupon.to_meta`, the ``{coupon:ID}:meta`` hash), so the
hot path never queries MySQL. Whether one more coupon may be issued is decided in one place,
``shared/redis/lua/issue.lua``, atomically with the reservation; nothing here re-implements it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from shared.errors import InvalidRequest

COUPON_TYPE = "FIRST_COME_FIRST_SERVED"
# Window bounds a coupon may use: the Redis snapshot keeps epoch milliseconds and MySQL's
# DATETIME ends with year 9999.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, tzinfo=UTC)


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def check_window(start: datetime, end: datetime) -> None:
    """The window must hold at least one millisecond as Redis sees it (the reservation script
    compares whole milliseconds): a shorter one would be accepted and never issue anything."""
    if to_ms(start) >= to_ms(end):
        raise InvalidRequest(
            "date_issue_start must be before date_issue_end, by at least a millisecond"
        )


def utc_naive(moment: datetime) -> datetime:
    """The form MySQL stores: UTC without tzinfo."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class Coupon:
    """A coupon as the gateway and the worker see it."""

    id: int
    title: str
    total_quantity: int | None
    discount_amount: int
    min_available_amount: int
    date_issue_start: datetime
    date_issue_end: datetime
    paused: bool = False
    coupon_type: str = COUPON_TYPE
    retired_reserved: int | None = None
    """None while the coupon lives; once retired, the stock slots held when it was retired
    (its Redis sets are gone then, so this is what its remaining stock is counted from)."""

    @property
    def retired(self) -> bool:
        return self.retired_reserved is not None

    @property
    def start_ms(self) -> int:
        return to_ms(self.date_issue_start)

    @property
    def end_ms(self) -> int:
        return to_ms(self.date_issue_end)

    def phase_at(self, now_ms: int) -> Literal["upcoming", "open", "closed"]:
        """Where the window stands at ``now_ms`` (Redis's clock, the one reservations judge by)."""
        if now_ms < self.start_ms:
            return "upcoming"
        return "open" if now_ms < self.end_ms else "closed"

    def to_meta(self) -> dict[str, str | int]:
        """The ``{coupon:ID}:meta`` hash."""
        reserved = self.retired_reserved
        retired = {} if reserved is None else {"retired_reserved": reserved}
        return {
            "id": self.id,
            "title": self.title,
            "coupon_type": self.coupon_type,
            "total": -1 if self.total_quantity is None else self.total_quantity,
            "discount_amount": self.discount_amount,
            "min_available_amount": self.min_available_amount,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "paused": int(self.paused),
            **retired,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> Coupon:
        total = int(meta["total"])
        return cls(
            id=int(meta["id"]),
            title=meta["title"],
            coupon_type=meta.get("coupon_type", COUPON_TYPE),
            total_quantity=None if total < 0 else total,
            discount_amount=int(meta["discount_amount"]),
            min_available_amount=int(meta["min_available_amount"]),
            date_issue_start=from_ms(int(meta["start_ms"])),
            date_issue_end=from_ms(int(meta["end_ms"])),
            paused=meta.get("paused") == "1",
            retired_reserved=_int_or_none(meta.get("retired_reserved")),
        )

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Coupon:
        return cls(
            id=int(row["id"]),
            title=row["title"],
            coupon_type=row["coupon_type"],
            total_quantity=row["total_quantity"],
            discount_amount=row["discount_amount"],
            min_available_amount=row["min_available_amount"],
            date_issue_start=row["date_issue_start"].replace(tzinfo=UTC),
            date_issue_end=row["date_issue_end"].replace(tzinfo=UTC),
            paused=bool(row["paused"]),
            retired_reserved=_int_or_none(row.get("retired_reserved")),
        )

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "coupon_type": self.coupon_type,
            "total_quantity": self.total_quantity,
            "discount_amount": self.discount_amount,
            "min_available_amount": self.min_available_amount,
            "date_issue_start": iso(self.date_issue_start),
            "date_issue_end": iso(self.date_issue_end),
            "paused": self.paused,
            "retired": self.retired,
        }


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
