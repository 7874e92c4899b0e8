"""The live drop feed: ``GET /v1/coupons/{id}/events`` tells every subscriber a coupon's state
the moment it changes (Server-Sent Events).

One :class:`Feed` per gateway process holds a :class:`Topic` per coupon that has subscribers.
One task reads the state of all of them from Redis every ``COUPON_FEED_INTERVAL_MS`` (the
Redis clock, then one pipeline of each coupon's reserved count; the snapshots come from the
process's cache), so ``remaining`` is coalesced to that period whatever the request rate, and
the cost does not grow with the subscribers. A ``coupons:sold_out`` message, which ``issue.lua``
publishes when a call takes the last slot, makes the task read that coupon at once: a coupon
sold out by any process is told by every process within a round trip. The window's start and
end are read at their moment (as Redis's clock has it, like the reservation script).

Subscribers keep no queue: each waits on its topic's change and writes the events from the state
it last sent to the newest (:func:`gateway.feed_events.transitions`), built once per topic and
state and shared by every subscriber in the same place, so a slow reader skips intermediate
states instead of piling them up. A reader that stops reading is cut off once its unsent bytes
pass :data:`SLOW_CLIENT_BYTES`; a heartbeat comment every ``COUPON_FEED_HEARTBEAT_SECONDS`` keeps
idle connections open through proxies and finds the clients that left.

Hand-written rather than ``aiohttp-sse``: that package runs a ping task per connection, where
here one timer wakes every subscriber and the events are built once for all of them.
"""

from __future__ import annotations

import asyncio
import random

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


class Topic:
    """One coupon's feed in this process: its newest state and its subscribers' wake-up."""

    def __init__(self, coupon_id: int) -> None:
        self.coupon_id = coupon_id
        self.state: FeedState | None = None
        self.subscribers = 0
        self.gone = False
        """The coupon no longer exists: its streams end (a reconnect gets 404)."""
        self.loading = asyncio.Lock()
        self.unreadable = False
        """Its first read failed: the subscribers waiting behind it are refused at once
        instead of each waiting out a Redis timeout of its own."""
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._frames: dict[str | None, bytes] = {}

    def update(self, state: FeedState) -> None:
        """Make ``state`` the newest and wake the subscribers, if it differs from the last."""
        if state == self.state:
            return
        since = None if self.state is None else Cursor.parse(self.state.cursor)
        for name, _ in transitions(since, state):
            metrics.FEED_EVENTS_SENT.labels(name).inc()
        self.state = state
        self._frames.clear()
        self.wake()

    def frames_since(self, cursor: str | None) -> bytes:
        """The events from the state ``cursor`` names (None: nothing known) to the newest."""
        assert self.state is not None  # a subscriber joins only once the topic has a state
        built = self._frames.get(cursor)
        if built is None:
            events = transitions(Cursor.parse(cursor), self.state)
            built = b"".join(frame(name, state) for name, state in events)
            if len(self._frames) >= _FRAMES_KEPT:
                self._frames.clear()
            self._frames[cursor] = built
        return built

    def wake(self) -> None:
        woken, self._changed = self._changed, asyncio.get_running_loop().create_future()
        woken.set_result(None)

    async def changed(self) -> None:
        """Until the next :meth:`wake` (a change, a heartbeat, the end)."""
        # Shielded: a subscriber's cancellation must not cancel everyone's future.
        await asyncio.shield(self._changed)


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

    @property
    def subscribers(self) -> int:
        return self._subscribers

    def news_handler(self) -> changes.Handler:
        """A sold-out is read at once; other changes wait for the next poll (they arrive as
        fast as pausing or a top-up needs, and a burst of released slots stays coalesced)."""
        return changes.Handler(
            changed=lambda _coupon_id: None, sold_out=self._read_now, resync=lambda: None
        )

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
            topic.wake()

    async def run(self, stop: asyncio.Event) -> None:
        """Read the topics' states and beat the heartbeat until ``stop`` is set."""
        await asyncio.gather(self._read_loop(stop), self._beat_loop(stop))

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
            self._urgent.clear()
            if due:
                await self._poll(due)

    async def _beat_loop(self, stop: asyncio.Event) -> None:
        """Wake every subscriber each heartbeat, on its own: a stalled Redis delays no beat."""
        while not stop.is_set():
            await changes.wait(stop, self._heartbeat)
            for topic in list(self._topics.values()):
                topic.wake()

    async def _join(self, coupon_id: int) -> Topic:
        if self._closing:
            raise Unavailable("this gateway is stopping; reconnect")
        if self._subscribers >= self._max:
            metrics.FEED_REFUSED.labels("full").inc()
            raise FeedFull(f"this gateway process holds {self._max} live feed subscribers")
        topic = self._topics.get(coupon_id)
        if topic is None:
            topic = self._topics[coupon_id] = Topic(coupon_id)
        topic.subscribers += 1
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
        topic.subscribers -= 1
        self._subscribers -= 1
        metrics.FEED_SUBSCRIBERS.dec()
        if topic.subscribers == 0 and self._topics.get(topic.coupon_id) is topic:
            del self._topics[topic.coupon_id]

    async def _serve(self, request: web.Request, topic: Topic) -> web.StreamResponse:
        response = web.StreamResponse(headers={**_HEADERS, **stream_headers(request)})
        await response.prepare(request)
        if request.method == "HEAD":  # the headers only: no stream to hold open
            return response
        transport = request.transport
        since = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        # Each client its own reconnection delay, between one and two times the setting: a
        # gateway that stops does not get all its subscribers back in the same instant.
        retry = random.randint(self._retry_ms, 2 * self._retry_ms)  # noqa: S311 - not a secret
        try:
            await response.write(b"retry: %d\n\n" % retry + topic.frames_since(since))
            assert topic.state is not None
            sent = topic.state.cursor
            while True:
                await topic.changed()
                if self._closing or topic.gone or transport is None or transport.is_closing():
                    break
                if transport.get_write_buffer_size() > SLOW_CLIENT_BYTES:
                    metrics.FEED_REFUSED.labels("slow").inc()
                    transport.close()
                    break
                state = topic.state
                if state.cursor == sent:
                    await response.write(HEARTBEAT)
                else:
                    await response.write(topic.frames_since(sent))
                    sent = state.cursor
        except ConnectionResetError:  # the client left
            pass
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
        """Read the topics' states in one pipeline and publish the changed ones."""
        coupons = [await self._snapshots.get(topic.coupon_id) for topic in topics]
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
        for topic, coupon in zip(topics, coupons, strict=True):
            if coupon is None:
                self._end(topic)
                continue
            held = reserved.get(coupon.id, coupon.retired_reserved or 0)
            state = FeedState.of(coupon, int(held), now_ms)
            topic.update(state)
            # The window's next edge within a poll: read it at its moment, not up to a poll late.
            edge = {"upcoming": coupon.start_ms, "open": coupon.end_ms}.get(state.phase)
            if edge is not None and edge - now_ms < self._interval * 1000:
                loop.call_later((edge - now_ms) / 1000 + 0.002, self._read_now, coupon.id)

    def _end(self, topic: Topic) -> None:
        topic.gone = True
        if self._topics.get(topic.coupon_id) is topic:
            del self._topics[topic.coupon_id]
        topic.wake()
