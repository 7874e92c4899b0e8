"""Counting every issue request once, by outcome (``coupon_issue_requests_total{outcome}``).

The issue routes wrap their whole decision in :func:`counted`: success counts as ``accepted``,
an :class:`AppError` as the outcome its class names, a request aiohttp refused itself (a body
over the limit) as ``invalid``. One place, so no path is counted twice or forgotten.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web

from shared import metrics
from shared.errors import AppError

# Bound once: a labelled child's inc() is the whole cost on the hot path.
_COUNTERS = {outcome: metrics.ISSUE_REQUESTS.labels(outcome) for outcome in metrics.ISSUE_OUTCOMES}


@contextmanager
def counted() -> Iterator[None]:
    try:
        yield
    except AppError as error:
        _COUNTERS[error.outcome].inc()
        raise
    except web.HTTPClientError:
        _COUNTERS["invalid"].inc()
        raise
    else:
        _COUNTERS["accepted"].inc()
