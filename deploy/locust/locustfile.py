"""Locust load test for a coupon drop, counting business outcomes, not only HTTP errors.

Each simulated user sends back-to-back issue requests (no think time, like the seed's test) for
one coupon with a random user id from a configurable range, on the native route or on the
seed-compatible one (a configurable share). Every answer is classified by what it means, from
its status and problem ``code`` (native) or its ``isSuccess``/``comment`` (seed), and reported
under ``<route> <outcome>`` (``native accepted``, ``seed sold_out``, ...): the statistics,
CSV files and charts show outcomes, and an HTTP 200 that says "sold out" is never a success in
disguise. Only answers that are neither a decision nor an expected refusal count as failures:
5xx, resets, timeouts, and anything unexpected.

Two user types: :class:`CouponDropUser` clicks from start to end, whatever the answers say.
:class:`FeedDropUser` clicks the same way but keeps the coupon's live feed open
(``GET /v1/coupons/{id}/events``) and clicks only while the feed says the window is open and
the coupon neither sold out nor paused: it waits for ``started`` when it arrives early, stops at
``sold_out`` and starts again at ``reopened``. Its feed connections are counted as
``feed <outcome>`` (``feed subscribed``, ``feed full``, ...; the time to the response's
headers), not as one request lasting the whole run. ``--feed-user-share`` sets the mix;
``locust -f ... FeedDropUser`` (or the web UI's ``--class-picker``) picks classes by name
instead, at equal weights.

With ``--accepted-dir DIR`` each locust process appends the users it was told "accepted" (and
those whose answer is unknown) to files there, so ``scripts/loadtest`` can check every one of
them against MySQL.

Options (also as environment variables, for the distributed compose file):
``--coupon-id`` (``LOCUST_COUPON_ID``, default 1), ``--user-id-min`` / ``--user-id-max``
(``LOCUST_USER_ID_MIN`` / ``LOCUST_USER_ID_MAX``, default 1 .. 10,000,000 as the seed),
``--seed-route-share`` (``LOCUST_SEED_ROUTE_SHARE``, 0..1, default 0.5),
``--seed-route`` (``LOCUST_SEED_ROUTE``, default ``/v2/issue-async``; ``/v1/issue`` is the
synchronous one), ``--feed-user-share`` (``LOCUST_FEED_USER_SHARE``, 0..1, default 0: the share
of users that are :class:`FeedDropUser`), ``--feed-timeout`` (``LOCUST_FEED_TIMEOUT``, default
60 s: a feed silent that long, four heartbeats at the gateway's default, is reconnected),
``--accepted-dir`` (``LOCUST_ACCEPTED_DIR``), ``--final-stats FILE`` (``LOCUST_FINAL_STATS``:
the complete per-outcome counts and percentiles as JSON, at exit; beside the entries, the key
``user_classes`` holds each class's users, answers by outcome and issue requests sent per 10 ms
of wall-clock time, and ``feed`` what the feed users heard).

    locust -f deploy/locust/locustfile.py --host http://127.0.0.1:8080 --coupon-id 1
    locust -f deploy/locust/locustfile.py --host http://127.0.0.1:8080 --feed-user-share 0.5
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import gevent
from gevent.event import Event
from geventhttpclient import HTTPClient
from geventhttpclient.response import HTTPParseError
from locust import FastHttpUser, events, stats, task
from locust.env import Environment
from locust.runners import Runner, WorkerRunner

stats.PERCENTILES_TO_CHART = [0.5, 0.95, 0.99]

# The native route's problem codes, and the seed's comments, mapped to the outcome names the
# gateway's coupon_issue_requests_total{outcome} uses, so the two can be compared.
NATIVE_CODES = {
    "DUPLICATED_COUPON_ISSUE": "duplicate",
    "INVALID_COUPON_ISSUE_QUANTITY": "sold_out",
    "INVALID_COUPON_ISSUE_DATE": "outside_window",
    "COUPON_PAUSED": "paused",
    "COUPON_NOT_EXIST": "not_found",
    "INVALID_REQUEST": "invalid",
    "RATE_LIMITED": "rate_limited",
}
SEED_COMMENTS = {
    "이미 발급된 쿠폰입니다.": "duplicate",
    "쿠폰 발급 수량이 유효하지 않습니다.": "sold_out",
    # The seed has one message for "outside the window" and "paused"; it reads as the former.
    "쿠폰 발급 기간이 유효하지 않습니다.": "outside_window",
    "존재하지 않는 쿠폰입니다.": "not_found",
}
STATUS_OUTCOMES = {400: "invalid", 404: "not_found", 413: "invalid", 429: "rate_limited"}
EXPECTED = {
    "accepted",
    "duplicate",
    "sold_out",
    "outside_window",
    "paused",
    "not_found",
    "invalid",
    "rate_limited",
}
"""Outcomes that are a definite answer; the rest (unavailable, error) are failures."""
FEED_CODES = {"FEED_FULL": "full", "COUPON_NOT_EXIST": "not_found", "RATE_LIMITED": "rate_limited"}
FEED_EXPECTED = {"subscribed", "full", "not_found", "rate_limited", "invalid"}
"""Feed connections that got a definite answer: the stream, or a refusal the API documents."""
ISSUE_ROUTES = ("native", "seed")
"""The first word of every issue request's statistics entry; feed connections say ``feed``."""


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: Any) -> None:
    parser.add_argument("--coupon-id", type=int, env_var="LOCUST_COUPON_ID", default=1)
    parser.add_argument("--user-id-min", type=int, env_var="LOCUST_USER_ID_MIN", default=1)
    parser.add_argument("--user-id-max", type=int, env_var="LOCUST_USER_ID_MAX", default=10_000_000)
    parser.add_argument(
        "--seed-route-share", type=float, env_var="LOCUST_SEED_ROUTE_SHARE", default=0.5
    )
    parser.add_argument(
        "--seed-route", type=str, env_var="LOCUST_SEED_ROUTE", default="/v2/issue-async"
    )
    parser.add_argument(
        "--feed-user-share", type=float, env_var="LOCUST_FEED_USER_SHARE", default=0.0
    )
    parser.add_argument("--feed-timeout", type=float, env_var="LOCUST_FEED_TIMEOUT", default=60.0)
    parser.add_argument("--accepted-dir", type=str, env_var="LOCUST_ACCEPTED_DIR", default="")
    parser.add_argument("--final-stats", type=str, env_var="LOCUST_FINAL_STATS", default="")


class _Journal:
    """Users told accepted, and users whose answer is unknown, appended to this process's
    files in batches (a locust process is one OS process; greenlets share this object)."""

    def __init__(self) -> None:
        self.directory: Path | None = None
        self._buffers: dict[str, list[int]] = {"accepted": [], "unknown": []}

    def note(self, kind: str, user_id: int) -> None:
        if self.directory is None:
            return
        buffer = self._buffers[kind]
        buffer.append(user_id)
        if len(buffer) >= 1000:
            self.flush()

    def flush(self) -> None:
        if self.directory is None:
            return
        for kind, buffer in self._buffers.items():
            if buffer:
                path = self.directory / f"{kind}-{os.getpid()}.txt"
                with path.open("a") as handle:
                    handle.write("".join(f"{user}\n" for user in buffer))
                buffer.clear()


journal = _Journal()


class _Tally:
    """What locust's request statistics do not hold, by user class: how many issue requests
    were sent in each 10 ms of wall-clock time (so a report can count those sent after the
    sold-out, a moment it learns on its own), the answers by outcome, and what the feed users
    heard. A worker sends its counts to the master with each stats report and starts again
    from zero; the master (or a single process) holds the sum."""

    def __init__(self) -> None:
        self.sent: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.answers: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.feed: Counter[str] = Counter()

    def note(self, user_class: str, sent_at: float, outcome: str) -> None:
        """One issue request answered (or failed): when it was sent, and what it meant. A
        request still under way when locust stops is in neither this nor the statistics."""
        self.sent[user_class][str(int(sent_at * 100))] += 1
        self.answers[user_class][outcome] += 1

    def drain(self) -> dict[str, Any]:
        data = {
            "sent": {name: dict(counts) for name, counts in self.sent.items()},
            "answers": {name: dict(counts) for name, counts in self.answers.items()},
            "feed": dict(self.feed),
        }
        self.sent.clear()
        self.answers.clear()
        self.feed.clear()
        return data

    def merge(self, data: dict[str, Any]) -> None:
        for name, counts in data.get("sent", {}).items():
            self.sent[name].update(counts)
        for name, counts in data.get("answers", {}).items():
            self.answers[name].update(counts)
        self.feed.update(data.get("feed", {}))


tally = _Tally()


@events.init.add_listener  # type: ignore[untyped-decorator]
def _init(environment: Environment, runner: Runner | None = None, **_: Any) -> None:
    options = environment.parsed_options
    if options is not None and options.accepted_dir:
        journal.directory = Path(options.accepted_dir)
        journal.directory.mkdir(parents=True, exist_ok=True)
    # The mix, unless classes were named on the command line. A worker keeps every class: it
    # spawns what the master dispatches.
    if options is not None and not options.user_classes and not isinstance(runner, WorkerRunner):
        share = options.feed_user_share
        if not 0 <= share <= 1:
            raise ValueError(f"--feed-user-share must be between 0 and 1, not {share}")
        if 0 < share < 1:
            FeedDropUser.weight = min(max(round(share * 1000), 1), 999)
            CouponDropUser.weight = 1000 - FeedDropUser.weight
        else:
            # One type only; the weights stay 1, as a class picker in the web UI expects.
            left_out = CouponDropUser if share == 1 else FeedDropUser
            environment.user_classes[:] = [c for c in environment.user_classes if c is not left_out]


@events.report_to_master.add_listener  # type: ignore[untyped-decorator]
def _report_to_master(data: dict[str, Any], **_: Any) -> None:
    data["coupon_drop"] = tally.drain()


@events.worker_report.add_listener  # type: ignore[untyped-decorator]
def _worker_report(data: dict[str, Any], **_: Any) -> None:
    tally.merge(data.get("coupon_drop") or {})


@events.test_stop.add_listener  # type: ignore[untyped-decorator]
def _test_stop(**_: Any) -> None:
    journal.flush()


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def _quitting(environment: Environment, **_: Any) -> None:
    journal.flush()
    options = environment.parsed_options
    runner = environment.runner
    if options is None or not options.final_stats or runner is None:
        return
    if isinstance(runner, WorkerRunner):
        return
    # Written when every user has stopped: locust's own CSV is refreshed once a second and
    # may miss the last second; this is the complete count.
    entries = [*runner.stats.entries.values(), runner.stats.total]
    final: dict[str, Any] = {
        entry.name: {
            "requests": entry.num_requests,
            "failures": entry.num_failures,
            "p50_ms": entry.get_response_time_percentile(0.5),
            "p95_ms": entry.get_response_time_percentile(0.95),
            "p99_ms": entry.get_response_time_percentile(0.99),
            "max_ms": entry.max_response_time,
            "rps": entry.total_rps,
        }
        for entry in entries
    }
    counts = tally.drain()
    users = runner.final_user_classes_count or {}
    final["user_classes"] = {
        name: {
            "users": users.get(name, 0),
            "answers": counts["answers"].get(name, {}),
            "sent_per_10ms": counts["sent"].get(name, {}),
        }
        for name in sorted(set(users) | set(counts["sent"]))
    }
    final["feed"] = counts["feed"]
    Path(options.final_stats).write_text(json.dumps(final, indent=2))


def native_outcome(status: int, body: dict[str, Any] | None) -> str:
    if status == 202:
        return "accepted"
    if status == 503:
        return "unavailable"
    code = (body or {}).get("code")
    if isinstance(code, str) and code in NATIVE_CODES:
        return NATIVE_CODES[code]
    return STATUS_OUTCOMES.get(status, "error")


def seed_outcome(status: int, body: dict[str, Any] | None) -> str:
    if status == 200 and body is not None:
        if body.get("isSuccess") is True:
            return "accepted"
        return SEED_COMMENTS.get(str(body.get("comment")), "error")
    return native_outcome(status, body)


def feed_outcome(status: int, body: dict[str, Any] | None) -> str:
    code = (body or {}).get("code")
    if isinstance(code, str) and code in FEED_CODES:
        return FEED_CODES[code]
    if status == 503:
        return "unavailable"
    return STATUS_OUTCOMES.get(status, "error")


def may_click(state: dict[str, Any]) -> bool:
    """What a drop page shows from the feed's last event: the button, or a notice."""
    return state.get("phase") == "open" and not state.get("sold_out") and not state.get("paused")


class _ClickingUser(FastHttpUser):
    """The click both user types make: one issue request, counted by what it means."""

    abstract = True
    connection_timeout = 10.0
    network_timeout = 10.0

    def click(self) -> None:
        options = self.environment.parsed_options
        coupon_id = options.coupon_id if options else 1
        low = options.user_id_min if options else 1
        high = options.user_id_max if options else 10_000_000
        share = options.seed_route_share if options else 0.5
        user_id = random.randint(low, high)  # noqa: S311 - load, not secrets
        if random.random() < share:  # noqa: S311
            route, classify = "seed", seed_outcome
            path = options.seed_route if options else "/v2/issue-async"
            payload: dict[str, int] = {"userId": user_id, "couponId": coupon_id}
            name = path
        else:
            route, classify = "native", native_outcome
            path = f"/v1/coupons/{coupon_id}/issues"
            payload = {"user_id": user_id}
            name = "/v1/coupons/[id]/issues"
        sent_at = time.time()
        with self.client.post(path, json=payload, name=name, catch_response=True) as response:
            status = response.status_code or 0
            try:
                body = response.json() if response.content else None
            except ValueError:
                body = None
            outcome = classify(status, body if isinstance(body, dict) else None)
            # Statistics by meaning: one row per route and outcome.
            response.request_meta["name"] = f"{route} {outcome}"
            tally.note(type(self).__name__, sent_at, outcome)
            if outcome == "accepted":
                journal.note("accepted", user_id)
            if outcome in EXPECTED:
                response.success()
            else:
                journal.note("unknown", user_id)
                response.failure(f"{outcome}: HTTP {status}")


class CouponDropUser(_ClickingUser):
    """One client clicking "get my coupon" as fast as the server answers."""

    @task
    def issue(self) -> None:
        self.click()


class FeedDropUser(_ClickingUser):
    """One client with the drop page open: it follows the coupon's live feed in a greenlet of
    its own and clicks like :class:`CouponDropUser` only while the feed's last event says the
    window is open and the coupon is neither sold out nor paused. It waits for ``started``
    when it arrives early, stops at ``sold_out`` (a click already under way finishes) and
    starts again at ``reopened``. When the feed refuses it before it has heard any state
    (``FEED_FULL``, an error), it clicks without one, as a page that cannot subscribe would,
    and keeps trying to subscribe; once it has heard a state, it keeps the last one it heard
    while it reconnects with ``Last-Event-ID``.

    The feed runs on a ``geventhttpclient`` connection of its own, not on ``self.client``:
    locust's client would time one request over the whole stream (or only its headers with
    ``stream=True``) and reads with the clicks' 10 s ``network_timeout``, shorter than the
    gateway's 15 s heartbeat, so an idle feed (after the sold-out) would time out and
    reconnect over and over. Here the stream reads with ``--feed-timeout``, each connection
    is one ``feed <outcome>`` entry timed to its headers, and what the stream said is counted
    in the final statistics' ``feed``.
    """

    def on_start(self) -> None:
        self._go = Event()
        self._heard_state = False
        self._last_id = ""
        self._retry_s = 2.0
        self._feed = gevent.spawn(self._follow)

    def on_stop(self) -> None:
        self._feed.kill(block=True, timeout=5)

    @task
    def issue(self) -> None:
        # Bounded, so that a user stopped while it waits ends within a second.
        if self._go.wait(timeout=1.0):
            self.click()

    # -- the feed ------------------------------------------------------------------------------

    def _follow(self) -> None:
        while True:
            try:
                wait = self._subscribe()
            except Exception as exc:  # a bug here must not end the feed, or the user, silently
                tally.feed["feed crashed"] += 1
                self._refused("error", 0.0, exc)
                wait = self._retry_s
            # Each connection waits the gateway's retry (it already varies per client) or its
            # Retry-After before the next.
            gevent.sleep(wait)

    def _subscribe(self) -> float:
        """One feed connection, until it ends; the seconds to wait before the next."""
        options = self.environment.parsed_options
        coupon_id = options.coupon_id if options else 1
        timeout = options.feed_timeout if options else 60.0
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self._last_id:
            headers["Last-Event-ID"] = self._last_id
        client = HTTPClient.from_url(
            self.host, concurrency=1, connection_timeout=self.connection_timeout,
            network_timeout=timeout,
        )  # fmt: skip
        started = time.perf_counter()
        try:
            try:
                response = client.get(f"/v1/coupons/{coupon_id}/events", headers=headers)
            except (OSError, HTTPParseError) as exc:
                self._refused("error", started, exc)
                return self._retry_s
            status = response.status_code
            if status != 200 or not str(response.get("content-type", "")).startswith(
                "text/event-stream"
            ):
                try:
                    body = json.loads(response.read() or b"null")
                except (ValueError, OSError, HTTPParseError):
                    body = None
                outcome = feed_outcome(status, body if isinstance(body, dict) else None)
                self._refused(outcome, started, None, status)
                retry_after = str(response.get("retry-after", ""))
                return float(retry_after) if retry_after.isdigit() else self._retry_s
            self._fire("subscribed", started, None)
            try:
                self._read(response)
                tally.feed["streams ended by the gateway"] += 1
            except (OSError, HTTPParseError):
                tally.feed["streams broken"] += 1
            return self._retry_s
        finally:
            client.close()

    def _read(self, response: Any) -> None:
        """Server-Sent Events, as the HTML standard parses them (the fields the feed sends)."""
        fields: dict[str, str] = {}
        while True:
            raw = response.readline(b"\n")
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n").removesuffix("\r")
            if not line:
                if "data" in fields:
                    self._heard(fields.get("event", "message"), fields.get("id"), fields["data"])
                fields = {}
            elif line.startswith(":"):
                tally.feed["heartbeats"] += 1
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "retry":
                    if value.isdigit():
                        self._retry_s = int(value) / 1000
                elif name == "data" and "data" in fields:
                    fields["data"] += "\n" + value
                else:
                    fields[name] = value

    def _heard(self, name: str, event_id: str | None, data: str) -> None:
        tally.feed[f"event {name}"] += 1
        if event_id:
            self._last_id = event_id
        try:
            state = json.loads(data)
        except ValueError:
            tally.feed["unreadable events"] += 1
            return
        if not isinstance(state, dict):
            tally.feed["unreadable events"] += 1
            return
        self._heard_state = True
        if may_click(state):
            if not self._go.is_set():
                tally.feed["clicking started"] += 1
                self._go.set()
        elif self._go.is_set():
            tally.feed["clicking stopped"] += 1
            self._go.clear()

    def _refused(
        self, outcome: str, started: float, exc: Exception | None, status: int = 0
    ) -> None:
        if exc is None and outcome not in FEED_EXPECTED:
            exc = RuntimeError(f"{outcome}: HTTP {status}")
        self._fire(outcome, started, exc)
        if not self._heard_state and not self._go.is_set():
            # Without a feed the page shows the button: click like the plain user.
            tally.feed["clicking without a feed"] += 1
            self._go.set()

    def _fire(self, outcome: str, started: float, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="SSE", name=f"feed {outcome}",
            response_time=(time.perf_counter() - started) * 1000 if started else 0.0,
            response_length=0, response=None, context={}, exception=exc,
        )  # fmt: skip
