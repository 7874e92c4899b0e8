"""Counting every issue request once, by outcome (``coupon_issue_requests_total{outcome}``).

The issue routes wrap their whole decision in :func:`counted`: success counts as ``accepted``,
an :class:`AppError` as the outcome its class names, a request aiohttp refused itself (a body
over the limit) as ``invalid``. One place, so no path is counted twice or forgotten.
"""

from __future__ import annotations

from aiohttp import web

from shared import metrics
from shared.errors import AppError

# Bound once: a labelled child's inc() is the whole cost on the hot path.
_COUNTERS = {outcome: metrics.ISSUE_REQUESTS.labels(outcome) for outcome in metrics.ISSUE_OUTCOMES}


class _Counted:
    """A class, not a ``@contextmanager`` generator: entered on every issue request, and a
    generator's ``throw`` on every rejection costs several times the counting itself."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: object
    ) -> None:
        if kind is None:
            _COUNTERS["accepted"].inc()
        elif isinstance(error, AppError):
            _COUNTERS[error.outcome].inc()
        elif isinstance(error, web.HTTPClientError):
            _COUNTERS["invalid"].inc()


_COUNTED = _Counted()


def counted() -> _Counted:
    """``with counted():`` around an issue request's whole decision."""
    return _COUNTED
