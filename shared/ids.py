"""The ids this service reads from outside, parsed in one place.

- Coupon and user ids are positive 64-bit integers, 1 .. 2^63-1 (MySQL ``BIGINT``), given as
  plain decimal digits in a path, a query, a token or a stream field, or as a JSON integer.
- Stream entry ids are Redis's ``<milliseconds>-<sequence>``; the milliseconds are the Redis
  clock at acceptance, which is what every age in the service is measured on.
"""

from __future__ import annotations

from shared.errors import InvalidRequest

MAX_ID = 2**63 - 1
MAX_INT32 = 2**31 - 1
_MAX_DIGITS = len(str(MAX_ID))


def decimal_or_none(raw: str, *, low: int = 1, high: int = MAX_ID) -> int | None:
    """``raw`` as an integer in ``low .. high`` when it is plain ASCII digits, else None.

    Nothing else passes: no sign, no spaces, no other Unicode digits (``int()`` would take
    ``" 42"``, ``"+42"`` and ``"٤٢"``), and no more digits than 2^63-1 has, so a huge string is
    refused before ``int()`` spends time on it.
    """
    if not raw.isascii() or not raw.isdigit() or len(raw) > _MAX_DIGITS:
        return None
    value = int(raw)
    return value if low <= value <= high else None


def id_or_none(raw: str) -> int | None:
    """A positive 64-bit id from text, or None."""
    return decimal_or_none(raw)


def parse_decimal(raw: str, name: str, *, low: int, high: int) -> int:
    """An integer from a path segment or query parameter; a 400 naming ``name`` otherwise."""
    value = decimal_or_none(raw, low=low, high=high)
    if value is None:
        raise InvalidRequest(f"{name} must be an integer between {low} and {high}")
    return value


def parse_id(raw: str, name: str) -> int:
    """A positive 64-bit id from text; a 400 naming ``name`` otherwise."""
    return parse_decimal(raw, name, low=1, high=MAX_ID)


def canonical_id(raw: str) -> int | None:
    """An id written exactly one way (no leading zero), or None: where the text itself is an
    identity (a token's ``sub``), ``"042"`` and ``"42"`` must not name the same user."""
    if raw.startswith("0"):
        return None
    return id_or_none(raw)


def json_id(value: object, name: str) -> int:
    """A positive 64-bit id from a JSON body; booleans and floats are refused (a 400)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise InvalidRequest(f"{name} must be an integer between 1 and {MAX_ID}")
    return value


def entry_ms(entry_id: str) -> int:
    """The Redis milliseconds at which a stream entry was added."""
    return int(entry_id.partition("-")[0])


def entry_order(entry_id: str) -> tuple[int, int]:
    """A key that sorts entry ids in stream order (as text, ``"9-0"`` would follow ``"10-0"``)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
