"""The load client: bounded load against gateway processes, every answer recorded.

Each request is classified the way Jepsen-style checkers do:

- ``ok``: 202 (or ``isSuccess: true`` on the seed's routes): the system promised a coupon;
- ``fail``: a definite rejection (400/401/403/404/409/413/429, or ``isSuccess: false``):
  nothing may have been reserved;
- ``unknown``: a timeout, a reset, a refused connection or any 5xx (503 included): it may or
  may not have happened.

Loads are bounded in count (the list of clicks) and in time (``within``): what is not sent by
the deadline is counted as not sent, never silently dropped.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from redis.asyncio import Redis

from shared.redis.scripts import IssueResult, Scripts

DEFINITE_REJECTIONS = frozenset({400, 401, 403, 404, 409, 413, 429})
NATIVE, SEED_ASYNC = "native", "seed-async"


class Kind(enum.Enum):
    OK = "ok"
    FAIL = "fail"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Answer:
    """One request and what its client saw."""

    coupon_id: int
    user_id: int
    kind: Kind
    status: int | None
    code: str | None
    request_id: str | None
    sent_at: float
    latency: float
    phase: str
    crossed: bool = False
    """The answer names another user or coupon than the request did."""
    error: str | None = None
    title: str | None = None
    """The problem's title: tells the 503s apart (overloaded, catching up, state lost…)."""


@dataclass
class History:
    """Every answer, in completion order."""

    answers: list[Answer] = field(default_factory=list)
    not_sent: int = 0

    def record(self, answer: Answer) -> None:
        self.answers.append(answer)

    def of(self, coupon_id: int) -> list[Answer]:
        return [a for a in self.answers if a.coupon_id == coupon_id]

    def partition(self, coupon_id: int) -> tuple[set[int], set[int], set[int]]:
        """(ok, unknown, fail-only) users of a coupon: a user with any ``ok`` is ok; else with
        any ``unknown`` is unknown; else every answer was a definite rejection."""
        kinds: dict[int, set[Kind]] = defaultdict(set)
        for answer in self.of(coupon_id):
            kinds[answer.user_id].add(answer.kind)
        ok = {u for u, k in kinds.items() if Kind.OK in k}
        unknown = {u for u, k in kinds.items() if Kind.UNKNOWN in k} - ok
        return ok, unknown, set(kinds) - ok - unknown

    def counts(self, *, phase: str | None = None) -> Counter[str]:
        return Counter(a.kind.value for a in self.answers if phase is None or a.phase == phase)

    def statuses(self, *, phase: str | None = None) -> Counter[str]:
        """``"202"``, ``"409 DUPLICATED_COUPON_ISSUE"``, ``"ServerDisconnectedError"``…"""
        return Counter(
            f"{a.status} {a.code or ''}".strip() if a.status is not None else str(a.error)
            for a in self.answers
            if phase is None or a.phase == phase
        )

    def ok_count(self) -> int:
        return sum(a.kind is Kind.OK for a in self.answers)

    def answered(self, phase: str) -> int:
        return sum(a.phase == phase for a in self.answers)


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class LoadClient:
    """Sends issue requests to one or more gateways with bounded concurrency.

    ``phase`` labels the answers of requests sent while it is set, so a test can tell what
    happened during a fault from what happened around it.
    """

    def __init__(
        self,
        base_urls: Sequence[str] | str,
        *,
        concurrency: int = 64,
        request_timeout: float = 5.0,
    ) -> None:
        self.base_urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        self.concurrency = concurrency
        self.history = History()
        self.phase = "load"
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._gate = asyncio.Semaphore(concurrency)
        self._ok_count = 0
        self._progress = asyncio.Event()
        self.sent: Counter[str] = Counter()
        """Requests sent, by phase (answered or not yet)."""
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> LoadClient:
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        # A test that failed mid-load leaves requests in flight: stop them before the session.
        unfinished = [task for task in self._tasks if not task.done()]
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def start(
        self,
        clicks: Iterable[tuple[int, int]],
        *,
        rate: float,
        within: float,
        route: str = NATIVE,
        stop: asyncio.Event | None = None,
    ) -> asyncio.Task[None]:
        """:meth:`paced` in the background; the client cancels it if the test leaves early."""
        task = asyncio.create_task(
            self.paced(clicks, rate=rate, within=within, route=route, stop=stop)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def click(
        self, coupon_id: int, user_id: int, *, route: str = NATIVE, target: int | None = None
    ) -> Answer:
        """One request; recorded in :attr:`history` and returned."""
        assert self._session is not None, "use LoadClient as an async context manager"
        base = self.base_urls[(user_id if target is None else target) % len(self.base_urls)]
        if route == NATIVE:
            url, body = f"{base}/v1/coupons/{coupon_id}/issues", {"user_id": user_id}
        else:
            url, body = f"{base}/v2/issue-async", {"userId": user_id, "couponId": coupon_id}
        phase = self.phase
        self.sent[phase] += 1
        started = time.monotonic()
        try:
            async with self._session.post(url, json=body) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            answer = Answer(
                coupon_id, user_id, Kind.UNKNOWN, None, None, None, started,
                time.monotonic() - started, phase, error=type(exc).__name__,
            )  # fmt: skip
        else:
            answer = _classify(
                coupon_id, user_id, route, status, raw, started, time.monotonic() - started, phase
            )
        self.history.record(answer)
        if answer.kind is Kind.OK:
            self._ok_count += 1
            self._progress.set()
        return answer

    async def paced(
        self,
        clicks: Iterable[tuple[int, int]],
        *,
        rate: float,
        within: float,
        route: str = NATIVE,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Send ``clicks`` (coupon, user) at about ``rate`` per second (``math.inf``: all at
        once), at most ``concurrency`` in flight; stop sending at ``within`` seconds or when
        ``stop`` is set. Returns when every sent request has its answer."""
        pending: set[asyncio.Task[Answer]] = set()
        clicks = list(clicks)
        started = time.monotonic()
        deadline = started + within
        for index, (coupon_id, user_id) in enumerate(clicks):
            due = started + (index / rate if math.isfinite(rate) else 0.0)
            now = time.monotonic()
            if due > deadline or now > deadline or (stop is not None and stop.is_set()):
                self.history.not_sent += len(clicks) - index
                break
            if due > now:
                # Pacing: the load's schedule, not a wait for a condition.
                await asyncio.sleep(due - now)
            await self._gate.acquire()
            task = asyncio.create_task(self._gated_click(coupon_id, user_id, route))
            pending.add(task)
            task.add_done_callback(pending.discard)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if pending:
            await asyncio.gather(*pending)

    async def _gated_click(self, coupon_id: int, user_id: int, route: str) -> Answer:
        try:
            return await self.click(coupon_id, user_id, route=route)
        finally:
            self._gate.release()

    async def accepting_again(self, since: float, *, more: int = 50, within: float = 60) -> float:
        """Wait for ``more`` oks beyond those counted so far (the service accepts again after
        a fault); returns when the first ok answered after ``since`` (monotonic) arrived."""
        await self.wait_for_oks(self._ok_count + more, within=within)
        return min(
            a.sent_at + a.latency
            for a in self.history.answers
            if a.kind is Kind.OK and a.sent_at >= since
        )

    async def wait_for_oks(self, count: int, *, within: float) -> None:
        """Wait until at least ``count`` requests were accepted (the load is really running)."""
        deadline = time.monotonic() + within
        while self._ok_count < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"only {self._ok_count} of {count} oks within {within} s")
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                pass


def _classify(
    coupon_id: int,
    user_id: int,
    route: str,
    status: int,
    raw: bytes,
    started: float,
    latency: float,
    phase: str,
) -> Answer:
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    body = body if isinstance(body, dict) else {}
    code = body.get("code") if isinstance(body.get("code"), str) else None
    title = body.get("title") if isinstance(body.get("title"), str) else None
    kind = Kind.UNKNOWN
    crossed = False
    request_id = None
    if route == NATIVE and status == 202:
        kind = Kind.OK
        request_id = str(body.get("request_id"))
        crossed = body.get("user_id") != user_id or body.get("coupon_id") != coupon_id
    elif route == SEED_ASYNC and status == 200:
        success = body.get("isSuccess")
        kind = Kind.OK if success is True else Kind.FAIL if success is False else Kind.UNKNOWN
        code = code or (None if success else str(body.get("comment")))
    elif status in DEFINITE_REJECTIONS:
        kind = Kind.FAIL
    return Answer(
        coupon_id, user_id, kind, status, code, request_id, started, latency, phase, crossed,
        title=title,
    )  # fmt: skip


async def reserve_directly(
    redis: Redis, coupon_id: int, users: list[int], history: History
) -> None:
    """Reserve through issue.lua (the gateway's own script, without HTTP), recording each
    user's answer as the gateway would have given it."""
    outcome = await Scripts(redis).reserve(coupon_id, users)
    assert not outcome.state_missing
    now = time.monotonic()
    for user, reservation in zip(users, outcome.reservations, strict=True):
        accepted = reservation.result is IssueResult.ACCEPTED
        history.record(
            Answer(
                coupon_id, user, Kind.OK if accepted else Kind.FAIL, 202 if accepted else 409,
                None, reservation.request_id or None, now, 0.0, "reserve",
            )
        )  # fmt: skip
