"""The stream worker: consumer group ``issuers`` on every active coupon's request stream.

Per batch: XREADGROUP, one MySQL transaction, COMMIT, then XACK (the next read and the last
acknowledgement overlap the commit; see :meth:`Worker.run`). An entry is acknowledged only
after its row is committed, so a crash anywhere leaves it pending; pending entries are re-read
on start (same consumer name) or taken over by another worker's reclaimer (XAUTOCLAIM). The
MySQL write is idempotent, so a second delivery is harmless. An entry delivered more than
``max_deliveries`` times is dead-lettered and its stock slot released.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import aiomysql
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from shared import keys, metrics
from shared.ids import id_or_none
from shared.mysql import issue_store
from shared.mysql.issue_store import BatchResult, Entry, Malformed
from shared.redis.replication import ReplicaWait
from shared.redis.scripts import Scripts
from shared.settings import Settings
from stream_worker.reader import Delivered, StreamReader

log = structlog.get_logger(__name__)


class Worker:
    """Moves accepted requests from Redis Streams into MySQL rows."""

    def __init__(self, redis: Redis, pool: aiomysql.Pool, settings: Settings) -> None:
        self._redis = redis
        self._pool = pool
        self._settings = settings
        self._waits_for_replicas = settings.redis_min_replicas > 0
        self._scripts = Scripts(redis, ReplicaWait.for_settings(redis, settings, path="worker"))
        self.name = settings.worker_name
        self._stopping = asyncio.Event()
        self._reader = StreamReader(redis, settings, self._stopping)
        self._next_reclaim = 0.0
        self._reading: asyncio.Task[list[Delivered]] | None = None
        """The read started ahead of the batch committing."""
        self._waiting: list[Delivered] = []
        """Read, waiting for a transaction: the rest of a read larger than a batch."""
        self._acking: asyncio.Task[None] | None = None
        """The acknowledgement of the last committed batch."""
        self._gave_up = False
        """A batch was abandoned at shutdown (MySQL down): leave the rest pending."""
        self._last_turn: float | None = None
        """When the loop last made progress or retried (time.monotonic()), for liveness."""

    def stop(self) -> None:
        """Finish the entries in hand, then return from :meth:`run`."""
        self._stopping.set()

    def seconds_since_turn(self) -> float | None:
        """How long ago the loop last turned (a read, a commit attempt, a retry); None before
        the first. A healthy worker turns at least every read block or retry pause."""
        return None if self._last_turn is None else time.monotonic() - self._last_turn

    def _turned(self) -> None:
        self._last_turn = time.monotonic()

    async def run(self, *, burst: bool = False) -> None:
        """Process entries until :meth:`stop`; with ``burst``, until there is nothing left.

        Burst mode reads without blocking and reclaims idle entries of other consumers, then
        returns once a full pass finds nothing to do, so tests need no sleeps.

        The next read runs while the last batch of the current one commits, and each batch's
        acknowledgement while the next one commits (one of each at most). Entries read ahead
        are as safe as the batch in hand: pending for this consumer, kept claimed through a
        MySQL outage, acknowledged only after their own commit.
        """
        log.info("worker_started", consumer=self.name, burst=burst)
        await self._reader.discover()
        await self._process_own_pending()
        try:
            while not self._stopping.is_set():
                self._turned()
                now = time.monotonic()
                if now >= self._reader.next_discovery:
                    await self._reader.discover()
                reclaim_due = burst or now >= self._next_reclaim
                delivered = await self._next_read(block=not burst)
                did_work = await self._handle_read(
                    delivered, read_ahead=not reclaim_due, block=not burst
                )
                if reclaim_due:
                    # With nothing in hand, so the reclaimer cannot take over our own entries.
                    await self._acknowledged()
                    did_work = await self._reclaim() or did_work
                    self._next_reclaim = now + self._settings.reclaim_idle_ms / 2000
                if burst and not did_work:
                    break
            if self._reading is not None and not self._gave_up:
                # Read before the stop: in hand too. (Given up means MySQL is down: what is
                # left stays pending for the next start or another worker.)
                await self._handle_read(await self._next_read(block=False), read_ahead=False)
            await self._acknowledged()
        finally:
            # Only left over when run() itself fails or is cancelled: the entries stay pending.
            for task in (self._reading, self._acking):
                if task is not None:
                    task.cancel()
        log.info("worker_stopped", consumer=self.name)

    async def _next_read(self, *, block: bool) -> list[Delivered]:
        """The read started ahead, if there is one, else a read now."""
        if self._reading is None:
            return await self._reader.read(block=block)
        reading, self._reading = self._reading, None
        return await reading

    async def _handle_read(
        self, delivered: list[Delivered], *, read_ahead: bool, block: bool = False
    ) -> bool:
        """Commit what one read returned, at most COUPON_BATCH_SIZE entries per transaction
        (XREADGROUP's COUNT is per stream), in stream order; start the next read before the
        last batch commits. Returns whether there was anything."""
        if not delivered:
            return False
        *first, last = _batches(delivered, self._settings.batch_size)
        for number, batch in enumerate(first, start=1):
            self._waiting = [entry for later in (*first[number:], last) for entry in later]
            await self._handle(batch)
            if self._gave_up:
                self._waiting = []
                return True
        self._waiting = []
        if read_ahead and not self._stopping.is_set():
            self._reading = asyncio.create_task(self._reader.read(block=block))
        await self._handle(last)
        return True

    def _held_besides(self) -> list[tuple[int, str]]:
        """Entries in hand besides the batch committing: the rest of its read, and the read
        ahead once it has returned."""
        held = [(coupon_id, entry_id) for coupon_id, entry_id, _ in self._waiting]
        ahead = self._reading
        if ahead is not None and ahead.done() and not ahead.cancelled() and not ahead.exception():
            held += [(coupon_id, entry_id) for coupon_id, entry_id, _ in ahead.result()]
        return held

    async def _process_own_pending(self) -> None:
        """Re-read what this consumer name had in hand before a restart, and settle it."""
        async for delivered in self._reader.own_pending():
            await self._handle(delivered)

    async def _reclaim(self) -> bool:
        """Take over entries idle longer than ``reclaim_idle_ms``; dead-letter the hopeless."""
        found = False
        limit = self._settings.max_deliveries
        async for claimed, deliveries in self._reader.idle():
            found = True
            metrics.WORKER_ENTRIES.labels("reclaimed").inc(len(claimed))
            hopeless = [d for d in claimed if deliveries.get(d[1], 0) > limit]
            retry = [d for d in claimed if deliveries.get(d[1], 0) <= limit]
            log.info(
                "entries_reclaimed",
                coupon_id=claimed[0][0],
                retry=len(retry),
                dead_letter=len(hopeless),
            )
            if retry:
                await self._handle(retry)
            if hopeless:
                await self._dead_letter(hopeless, deliveries, "max_deliveries")
        return found

    async def _handle(self, delivered: list[Delivered]) -> None:
        """Commit a batch to MySQL, then acknowledge it. Malformed entries stay pending."""
        entries: list[Entry] = []
        for coupon_id, entry_id, fields in delivered:
            try:
                entries.append(Entry.parse(coupon_id, entry_id, fields))
            except Malformed as exc:
                metrics.WORKER_ENTRIES.labels("malformed").inc()
                log.warning(
                    "entry_malformed", coupon_id=coupon_id, entry_id=entry_id, error=str(exc)
                )
        if self._waits_for_replicas:
            entries = await self._replicated(entries)
        if not entries:
            return
        result = await self._commit(entries)
        if result is None:
            return
        # The acknowledgement runs while the next batch commits; one at a time, so at most one
        # committed batch waits for its XACK (a crash before it only means a redelivery).
        await self._acknowledged()
        self._acking = asyncio.create_task(self._acknowledge(result))

    async def _acknowledged(self) -> None:
        """Wait for the acknowledgement in flight, if any."""
        if self._acking is not None:
            acking, self._acking = self._acking, None
            await acking

    async def _replicated(self, entries: list[Entry]) -> list[Entry]:
        """The entries the replicas hold, waited for (COUPON_REDIS_MIN_REPLICAS).

        A row for an entry only the primary holds would outlive a failover that loses the
        entry, its dedup slot and its stock count, and the stock would be sold again: more
        rows than coupons. So nothing is written before the replicas confirm it; until then
        the entries stay claimed here and the claim and its WAIT are retried, with back-off.
        Entries the claim no longer finds as they were read (lost with a failed primary, or
        their id given to another request by the new one) are dropped: their requests never
        got a 202, only an "outcome unknown" 503, and whatever holds their id now is read
        afresh.
        """
        delay = 0.05
        while True:
            self._turned()
            try:
                claimed, confirmed = await self._claim_replicated(entries)
            except (RedisError, RedisClusterException, OSError) as exc:
                claimed, confirmed = set(), False
                log.warning("replica_check_failed", entries=len(entries), error=repr(exc))
            else:
                held = [e for e in entries if e.entry_id in claimed]
                if confirmed:
                    if len(held) < len(entries):
                        # Acknowledged by another worker meanwhile, or lost with a primary.
                        log.info("entries_no_longer_pending", count=len(entries) - len(held))
                    return held
                log.warning("replicas_behind", entries=len(entries), retry_in=delay)
            # The batch is claimed again at each attempt; what else is in hand must be too, or
            # another worker takes it over (a delivery counted) during a long replica outage.
            await self._reader.keep_claimed(self._held_besides())
            if self._stopping.is_set() and delay >= self._settings.mysql_retry_max_seconds:
                log.warning("batch_abandoned_at_shutdown", entries=len(entries))
                self._gave_up = True
                return []
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._settings.mysql_retry_max_seconds)

    async def _claim_replicated(self, entries: list[Entry]) -> tuple[set[str], bool]:
        """Re-claim the entries, per coupon, as the very requests read (``claim.lua``), and
        WAIT; (the ids still pending as read, whether the replicas confirmed every call)."""
        by_coupon: dict[int, list[tuple[str, int]]] = {}
        for entry in entries:
            by_coupon.setdefault(entry.coupon_id, []).append((entry.entry_id, entry.user_id))
        claimed: set[str] = set()
        confirmed = True
        for coupon_id, held in by_coupon.items():
            ids, done = await self._scripts.claim_replicated(coupon_id, self.name, held)
            claimed |= ids
            confirmed = confirmed and done
        return claimed, confirmed

    async def _commit(self, entries: list[Entry]) -> BatchResult | None:
        """Write the batch, retrying transient MySQL failures until it lands or we stop.

        While retrying, the entries are re-claimed (JUSTID, which does not count a delivery)
        so other workers do not take them over and an outage never dead-letters anything.
        A data error splits the batch in halves until the bad entry stands alone; it is left
        pending for the delivery limit to catch.
        """
        delay = 0.05
        while True:
            self._turned()
            started = time.perf_counter()
            try:
                result = await issue_store.write_batch(self._pool, entries)
            except Exception as exc:
                if not issue_store.is_transient(exc):
                    return await self._bisect(entries, exc)
                metrics.WORKER_MYSQL_UP.set(0)
                log.warning(
                    "mysql_unavailable", entries=len(entries), retry_in=delay, error=repr(exc)
                )
                if self._stopping.is_set() and delay >= self._settings.mysql_retry_max_seconds:
                    log.warning("batch_abandoned_at_shutdown", entries=len(entries))
                    self._gave_up = True
                    return None
                await self._reader.keep_claimed(
                    [(e.coupon_id, e.entry_id) for e in entries] + self._held_besides()
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.mysql_retry_max_seconds)
                continue
            metrics.WORKER_MYSQL_UP.set(1)
            metrics.WORKER_COMMIT_SECONDS.observe(time.perf_counter() - started)
            metrics.WORKER_BATCH_SIZE.observe(len(entries))
            _observe_time_to_issue(result.inserted)
            return result

    async def _bisect(self, entries: list[Entry], exc: Exception) -> BatchResult | None:
        if len(entries) == 1:
            metrics.WORKER_ENTRIES.labels("failed").inc()
            log.error(
                "entry_failed",
                entry_id=entries[0].entry_id,
                coupon_id=entries[0].coupon_id,
                error=repr(exc),
            )
            return None
        middle = len(entries) // 2
        for half in (entries[:middle], entries[middle:]):
            result = await self._commit(half)
            if result is not None:
                await self._acknowledge(result)
        return BatchResult()

    async def _acknowledge(self, result: BatchResult) -> None:
        """Mark issued users and XACK, then release the dead-lettered; retried until done."""
        by_coupon: dict[int, list[Entry]] = {}
        for entry in result.issued:
            by_coupon.setdefault(entry.coupon_id, []).append(entry)
        for coupon_id, entries in by_coupon.items():
            k = keys.CouponKeys(coupon_id)

            async def ack(k: keys.CouponKeys = k, entries: list[Entry] = entries) -> None:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.sadd(k.issued, *(e.user_id for e in entries))
                    pipe.xack(k.requests, keys.GROUP, *(e.entry_id for e in entries))
                    await pipe.execute()

            await self._until_done(ack)
        if result.to_dead_letter:
            await self._release(result.to_dead_letter, "over_cap", {})
        metrics.WORKER_ENTRIES.labels("committed").inc(len(result.inserted))
        metrics.WORKER_ENTRIES.labels("already_issued").inc(len(result.already_issued))
        if result.inserted or result.already_issued:
            log.info(
                "batch_committed",
                inserted=len(result.inserted),
                already_issued=len(result.already_issued),
                dead_lettered=len(result.to_dead_letter),
                unknown_coupon=len(result.unknown_coupon),
            )
        if result.unknown_coupon:
            log.warning("coupon_missing_in_mysql", entries=len(result.unknown_coupon))

    async def _dead_letter(
        self, hopeless: list[Delivered], deliveries: dict[str, int], reason: str
    ) -> None:
        """Give up on entries: decided in MySQL first (a late commit wins), then released."""
        entries: list[Entry] = []
        for coupon_id, entry_id, fields in hopeless:
            try:
                entries.append(Entry.parse(coupon_id, entry_id, fields))
            except Malformed:
                # No user can ever hold a row for it; release what it names, if anything.
                user_id = id_or_none(fields.get("u", ""))
                await self._until_done(
                    lambda c=coupon_id, e=entry_id, u=user_id: self._scripts.release(
                        c, e, u, "malformed", deliveries.get(e, 0)
                    )
                )
                metrics.WORKER_ENTRIES.labels("dead_lettered").inc()
                log.warning(
                    "entry_dead_lettered",
                    coupon_id=coupon_id,
                    entry_id=entry_id,
                    reason="malformed",
                )
        if not entries:
            return
        try:
            result = await issue_store.dead_letter(self._pool, entries, reason)
        except Exception as exc:
            log.warning("dead_letter_deferred", entries=len(entries), error=repr(exc))
            return
        await self._acknowledge(BatchResult(already_issued=result.already_issued))
        await self._release(result.to_dead_letter, reason, deliveries)

    async def _release(self, entries: list[Entry], reason: str, deliveries: dict[str, int]) -> None:
        for entry in entries:
            await self._until_done(
                lambda e=entry: self._scripts.release(
                    e.coupon_id, e.entry_id, e.user_id, reason, deliveries.get(e.entry_id, 0)
                )
            )
            metrics.WORKER_ENTRIES.labels("dead_lettered").inc()
            log.warning(
                "entry_dead_lettered",
                coupon_id=entry.coupon_id,
                entry_id=entry.entry_id,
                user_id=entry.user_id,
                reason=reason,
            )

    async def _until_done(self, action: Any) -> None:
        """Retry a Redis write after a commit until it succeeds or we stop.

        Giving up is safe: the entry stays pending and its redelivery is idempotent.
        """
        delay = 0.05
        while True:
            self._turned()
            try:
                await action()
                return
            except (RedisError, OSError) as exc:
                if self._stopping.is_set():
                    log.warning("ack_abandoned_at_shutdown", error=repr(exc))
                    return
                log.warning("ack_failed", retry_in=delay, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

def _batches(delivered: list[Delivered], size: int) -> list[list[Delivered]]:
    return [delivered[start : start + size] for start in range(0, len(delivered), size)]


def _observe_time_to_issue(inserted: Sequence[Entry]) -> None:
    """Only rows created now: a redelivered entry's wait was counted when its row was made.
    Two clocks meet here (Redis's and this host's); a negative gap is skew and counts as 0."""
    committed_ms = time.time() * 1000
    observe = metrics.WORKER_TIME_TO_ISSUE_SECONDS.observe
    for entry in inserted:
        observe(max(committed_ms - entry.accepted_ms, 0.0) / 1000)
