"""The live drop feed: ``GET /v1/coupons/{id}/events`` tells every subscriber a coupon's state
the moment it changes (Server-Sent Events).

One :class:`Feed` per gateway process holds a :class:`Topic` per coupon that has subscribers.
One task reads the state of all of them from Redis every ``COUPON_FEED_INTERVAL_MS`` (the
Redis clock, then one pipeline of each coupon's reserved count; the snapshots come from the
process's cache), so ``remaining`` is coalesced to that period whatever the request rate, and
the reads do not grow with the subscribers. A ``coupons:sold_out`` message, which ``issue.lua``
publishes when a call takes the last slot, makes the task read that coupon at once: a coupon
sold out by any process is told by every process within a round trip. The window's start and
end are read at their moment (as Redis's clock has it, like the reservation script).

The fan-out is one loop in that task, not a coroutine per subscriber: it writes each
subscriber's events straight to its transport, framed in the response's chunked encoding (a
subscriber's handler only waits for its end). The events from a state to the newest
(:func:`gateway.feed_events.transitions`) are built once per topic and state and shared by
every subscriber at that state, so a wave of an event costs one buffered write per subscriber
and no allocation per subscriber; waking thousands of coroutines, as a first version did, cost
the issue route most of its speed (docs/PERFORMANCE.md). Writes of ``remaining`` alone are held
to :data:`REMAINING_WRITES_PER_SECOND` per process: with many subscribers a coupon's
``remaining`` comes less often than every interval; every other event goes out at once.

Subscribers keep no queue, so a slow reader costs its own unsent bytes only, and one that stops
reading is cut off once they pass :data:`SLOW_CLIENT_BYTES`. A heartbeat comment every
``COUPON_FEED_HEARTBEAT_SECONDS`` keeps idle connections open through proxies; clients that
left are noticed within :data:`SWEEP_SECONDS` (their transport closes) and free their slot.

Hand-written rather than ``aiohttp-sse``: that package runs a ping task per connection and a
coroutine write per event, where here one loop serves every subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket

import structlog
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from gateway import changes
from gateway.feed_events import Cursor, FeedState, frame, transitions
from gateway.problems import stream_headers
from gateway.snapshots import SnapshotCache
from shared import keys, metrics
from shared.errors import CouponNotFound, FeedFull, Unavailable

log = structlog.get_logger(__name__)

SLOW_CLIENT_BYTES = 64 * 1024
"""Unsent bytes after which a subscriber that stopped reading is disconnected."""
REMAINING_WRITES_PER_SECOND = 5_000
"""Most ``remaining`` writes a gateway process makes a second, over all its subscribers: each is
a system call, and 5,000 subscribers told four times a second took a fifth of a core. Past
1,250 subscribers (at the default interval), ``remaining`` comes less often than each poll."""
SWEEP_SECONDS = 1.0
"""How often the subscribers whose connection closed are let go (their slot freed)."""
HEARTBEAT = b": keep-alive\n\n"
_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each event through at once
}
_REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)
_FRAMES_KEPT = 64
"""Distinct ``since`` states whose events a topic keeps built (nearly every subscriber is at
the topic's previous state; resuming clients may bring others)."""


class Subscriber:
    """One client of a topic: where its events go, what it was last told, and its end."""

    __slots__ = ("_chunked", "done", "sent", "transport")

    def __init__(self, transport: asyncio.Transport, *, chunked: bool, sent: str) -> None:
        self.transport = transport
        self._chunked = chunked
        self.sent = sent
        """The cursor of the last state written to it."""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def write(self, data: bytes) -> bool:
        """Queue ``data`` on the connection; False when the subscriber must go (it left, or
        stopped reading)."""
        transport = self.transport
        if transport.is_closing():
            return False
        if transport.get_write_buffer_size() > SLOW_CLIENT_BYTES:
            metrics.FEED_REFUSED.labels("slow").inc()
            # abort, not close: close() waits for the unsent bytes to go, which they never do.
            transport.abort()
            return False
        if self._chunked:  # the response's framing, as aiohttp's writer would have made it
            transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            transport.write(data)
        return True

    def end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Topic:
    """One coupon's feed in this process: its newest state and its subscribers."""

    def __init__(self, coupon_id: int) -> None:
        self.coupon_id = coupon_id
        self.state: FeedState | None = None
        self.subscribers: set[Subscriber] = set()
        self.held = 0
        """Subscribers admitted to it: streaming, or waiting for its first read."""
        self.gone = False
        """The coupon no longer exists: its streams end (a reconnect gets 404)."""
        self.loading = asyncio.Lock()
        self.unreadable = False
        """Its first read failed: the subscribers waiting behind it are refused at once
        instead of each waiting out a Redis timeout of its own."""
        self.next_remaining = 0.0
        """Loop time before which a change of ``remaining`` alone is held back."""
        self.read_failing = False
        """Its snapshot could not be read at the last poll (logged once until it can)."""
        self.read_ms = 0
        """Redis time of the read its state came from: an older read that ends later (the
        first subscriber's and a poll's at once) must not undo a newer one."""
        self._frames: dict[str | None, bytes] = {}

    def update(self, state: FeedState) -> None:
        """Make ``state`` the newest and write every subscriber what it has not heard."""
        if state == self.state:
            return
        since = None if self.state is None else self.state.told
        for name, _ in transitions(since, state):
            metrics.FEED_EVENTS_SENT.labels(name).inc()
        self.state = state
        self._frames.clear()
        cursor = state.cursor
        for subscriber in list(self.subscribers):
            if subscriber.write(self.frames_since(subscriber.sent)):
                subscriber.sent = cursor
            else:
                self.drop(subscriber)

    def frames_since(self, cursor: str | None) -> bytes:
        """The events from the state ``cursor`` names (None: nothing known) to the newest."""
        assert self.state is not None  # a subscriber streams only once the topic has a state
        built = self._frames.get(cursor)
        if built is None:
            events = transitions(Cursor.parse(cursor), self.state)
            built = b"".join(frame(name, state) for name, state in events)
            if len(self._frames) >= _FRAMES_KEPT:
                self._frames.clear()
            self._frames[cursor] = built
        return built

    def beat(self) -> None:
        """A heartbeat comment to every subscriber."""
        for subscriber in list(self.subscribers):
            if not subscriber.write(HEARTBEAT):
                self.drop(subscriber)

    def sweep(self) -> None:
        """Let go of the subscribers whose connection closed."""
        for subscriber in list(self.subscribers):
            if subscriber.transport.is_closing():
                self.drop(subscriber)

    def drop(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        subscriber.end()

    def end_all(self) -> None:
        for subscriber in list(self.subscribers):
            self.drop(subscriber)


class Feed:
    """Every live feed of one gateway process."""

    def __init__(
        self,
        redis: Redis,
        snapshots: SnapshotCache,
        *,
        max_subscribers: int,
        interval_seconds: float,
        heartbeat_seconds: float,
        retry_ms: int,
    ) -> None:
        self._redis = redis
        self._snapshots = snapshots
        self._max = max_subscribers
        self._interval = interval_seconds
        self._heartbeat = heartbeat_seconds
        self._retry_ms = retry_ms
        self._topics: dict[int, Topic] = {}
        self._subscribers = 0
        self._urgent: set[int] = set()
        self._wake = asyncio.Event()
        self._closing = False
        self._failing = False

    def news_handler(self) -> changes.Handler:
        """A sold-out is read at once; other changes wait for the next poll (they arrive as
        fast as pausing or a top-up needs, and a burst of released slots stays coalesced)."""
        return changes.Handler(sold_out=self._read_now)

    async def stream(self, request: web.Request, coupon_id: int) -> web.StreamResponse:
        """Serve one subscriber until it leaves, the coupon goes or the gateway stops."""
        topic = await self._join(coupon_id)
        try:
            return await self._serve(request, topic)
        finally:
            self._leave(topic)

    def close(self) -> None:
        """End every stream (the gateway stops: clients reconnect to another process)."""
        self._closing = True
        for topic in list(self._topics.values()):
            topic.end_all()

    async def run(self, stop: asyncio.Event) -> None:
        """Read the topics' states and beat the heartbeat until ``stop`` is set."""
        await asyncio.gather(self._read_loop(stop), self._keep_loop(stop))

    async def _read_loop(self, stop: asyncio.Event) -> None:
        """All topics every interval, the urgent ones at once."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + self._interval
        while not stop.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_poll - loop.time()))
            except TimeoutError:
                pass
            self._wake.clear()
            if loop.time() >= next_poll:
                due = list(self._topics.values())
                next_poll = loop.time() + self._interval
            else:
                due = [self._topics[i] for i in self._urgent if i in self._topics]
            due = [topic for topic in due if topic.state is not None]  # else its first read runs
            self._urgent.clear()
            if due:
                await self._poll(due)

    async def _keep_loop(self, stop: asyncio.Event) -> None:
        """Let go of the clients that left, and beat the heartbeat; on its own, so a stalled
        Redis delays neither."""
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self._heartbeat
        while not stop.is_set():
            await changes.wait(stop, min(SWEEP_SECONDS, self._heartbeat))
            beat = loop.time() >= next_beat
            if beat:
                next_beat = loop.time() + self._heartbeat
            for topic in list(self._topics.values()):
                if beat:
                    topic.beat()  # which also lets go of the clients that left
                else:
                    topic.sweep()

    async def _join(self, coupon_id: int) -> Topic:
        if self._closing:
            raise Unavailable("this gateway is stopping; reconnect")
        if self._subscribers >= self._max:
            metrics.FEED_REFUSED.labels("full").inc()
            raise FeedFull(f"this gateway process holds {self._max} live feed subscribers")
        topic = self._topics.get(coupon_id)
        if topic is None:
            topic = self._topics[coupon_id] = Topic(coupon_id)
        topic.held += 1
        self._subscribers += 1
        metrics.FEED_SUBSCRIBERS.inc()
        try:
            if topic.state is None:
                async with topic.loading:  # the first subscriber reads; the others wait
                    if topic.state is None and not topic.gone:
                        if topic.unreadable:
                            raise RedisError("the first read of this coupon failed")
                        await self._read([topic])
        except _REDIS_ERRORS:
            topic.unreadable = topic.state is None
            self._leave(topic)
            raise Unavailable("Redis is unreachable") from None
        except BaseException:
            self._leave(topic)
            raise
        if topic.gone:
            self._leave(topic)
            raise CouponNotFound(f"coupon {coupon_id} does not exist")
        return topic

    def _leave(self, topic: Topic) -> None:
        topic.held -= 1
        self._subscribers -= 1
        metrics.FEED_SUBSCRIBERS.dec()
        if topic.held == 0 and self._topics.get(topic.coupon_id) is topic:
            del self._topics[topic.coupon_id]

    async def _serve(self, request: web.Request, topic: Topic) -> web.StreamResponse:
        response = web.StreamResponse(headers={**_HEADERS, **stream_headers(request)})
        await response.prepare(request)
        transport = request.transport
        if request.method == "HEAD" or transport is None:  # no stream to hold open
            return response
        assert topic.state is not None
        raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        since = raw if Cursor.parse(raw) is not None else None  # every unreadable id is one
        first, sent = topic.frames_since(since), topic.state.cursor
        # Each client its own reconnection delay, between one and two times the setting: a
        # gateway that stops does not get all its subscribers back in the same instant.
        retry = random.randint(self._retry_ms, 2 * self._retry_ms)  # noqa: S311 - not a secret
        try:
            await response.write(b"retry: %d\n\n" % retry + first)  # the headers go with it
        except ConnectionResetError:  # the client left already
            return response
        if self._closing or topic.gone:
            return response
        subscriber = Subscriber(
            transport, chunked=response.headers.get("Transfer-Encoding") == "chunked", sent=sent
        )
        _drop_when_unacknowledged(transport, max(2 * self._heartbeat, 10.0))
        topic.subscribers.add(subscriber)
        if topic.state.cursor != sent:  # it changed while the first write was on its way
            if subscriber.write(topic.frames_since(sent)):
                subscriber.sent = topic.state.cursor
            else:
                topic.drop(subscriber)
        try:
            await subscriber.done  # the loops write; this ends when they let go of it
        finally:
            topic.subscribers.discard(subscriber)
        return response

    def _read_now(self, coupon_id: int) -> None:
        if coupon_id in self._topics:
            self._urgent.add(coupon_id)
            self._wake.set()

    async def _poll(self, topics: list[Topic]) -> None:
        """:meth:`_read`; a failure keeps the last states (said once per outage). Nothing
        ends the loop: Redis away, its state lost (until a rebuild), or a bug."""
        try:
            await self._read(topics)
        except Exception as exc:  # logged; the next poll tries again
            if not self._failing:
                log.warning("feed_read_failed", error=repr(exc))
            self._failing = True
            return
        if self._failing:
            log.info("feed_read_recovered")
        self._failing = False

    async def _read(self, topics: list[Topic]) -> None:
        """Read the topics' states (the snapshots at once, then Redis's clock and the reserved
        counts) and publish the changed ones. A coupon whose snapshot cannot be read keeps its
        last state, and holds up no other."""
        loaded = await asyncio.gather(
            *(self._snapshots.get(topic.coupon_id) for topic in topics), return_exceptions=True
        )
        if loaded and all(isinstance(result, BaseException) for result in loaded):
            raise next(r for r in loaded if isinstance(r, BaseException))  # Redis is away
        pairs = [(t, c) for t, c in zip(topics, loaded, strict=True) if not _failed(t, c)]
        topics = [t for t, _ in pairs]
        coupons = [c for _, c in pairs if not isinstance(c, BaseException)]
        counted = [c.id for c in coupons if c is not None and c.retired_reserved is None]
        # TIME apart: a Cluster pipeline refuses a command without a key. On a Cluster it is
        # one node's clock for every coupon (nodes run NTP; the reservation reads its own).
        seconds, micros = await self._redis.time()
        counts = []
        if counted:
            async with self._redis.pipeline(transaction=False) as pipe:
                for coupon_id in counted:
                    pipe.scard(keys.CouponKeys(coupon_id).users)
                counts = await pipe.execute()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        reserved = dict(zip(counted, counts, strict=True))
        loop = asyncio.get_running_loop()
        # The remaining-writes budget, spread over this process's subscribers.
        period = max(self._interval, self._subscribers / REMAINING_WRITES_PER_SECOND)
        for topic, coupon in zip(topics, coupons, strict=True):
            if coupon is None:
                self._end(topic)
                continue
            if now_ms < topic.read_ms:
                continue
            topic.read_ms = now_ms
            held = reserved.get(coupon.id, coupon.retired_reserved or 0)
            state = FeedState.of(coupon, int(held), now_ms)
            if state != topic.state and not (
                _remaining_alone(topic.state, state) and loop.time() < topic.next_remaining
            ):
                topic.update(state)
                topic.next_remaining = loop.time() + period
            # The window's next edge within a poll: read it at its moment, not up to a poll late.
            edge = {"upcoming": coupon.start_ms, "open": coupon.end_ms}.get(state.phase)
            if edge is not None and edge - now_ms < self._interval * 1000:
                loop.call_later((edge - now_ms) / 1000 + 0.002, self._read_now, coupon.id)

    def _end(self, topic: Topic) -> None:
        topic.gone = True
        if self._topics.get(topic.coupon_id) is topic:
            del self._topics[topic.coupon_id]
        topic.end_all()


def _drop_when_unacknowledged(transport: asyncio.BaseTransport, seconds: float) -> None:
    """A client that vanished without a FIN (a NAT or a phone losing its network) never closes
    its transport: the kernel would retransmit the heartbeats for a quarter of an hour. With
    TCP_USER_TIMEOUT it gives up once data stays unacknowledged this long (two heartbeats), the
    transport closes, and the sweep frees the slot. Linux only; elsewhere the OS's own timeouts."""
    sock = transport.get_extra_info("socket")
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if sock is None or option is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, option, int(seconds * 1000))


def _failed(topic: Topic, loaded: object) -> bool:
    """Whether the topic's snapshot load failed (said once per coupon until it reads again)."""
    if isinstance(loaded, BaseException):
        if not topic.read_failing:
            log.warning("feed_coupon_read_failed", coupon_id=topic.coupon_id, error=repr(loaded))
        topic.read_failing = True
        return True
    topic.read_failing = False
    return False


def _remaining_alone(told: FeedState | None, state: FeedState) -> bool:
    """Whether the only news from ``told`` to ``state`` is a ``remaining`` event."""
    if told is None:
        return False
    return [name for name, _ in transitions(told.told, state)] == ["remaining"]
