"""A stream worker process that dies, or freezes, at one chosen point of its first batch.

Run as ``python -m tests.fault.crashing_worker`` with ``FAULT_CRASH_AT`` set to one of
:data:`POINTS`, and the usual ``COUPON_*`` variables. Everything else is the production
worker process (``stream_worker.__main__``: the same wiring, signals and start-up checks); only
the :class:`~stream_worker.worker.Worker` class is swapped for the subclass below.

- ``before_commit``: ``os._exit`` after reading a batch, before the MySQL transaction;
- ``after_commit``: after COMMIT, before any XACK;
- ``mid_ack``: after acknowledging the first half of the batch's entries;
- ``pause_before_commit`` / ``pause_after_commit``: the process SIGSTOPs itself at that point
  (a zombie, F4, or one of two workers holding the same entries, F6); once continued it
  finishes that batch like any worker, then exits 0;
- ``pause_in_transaction``: the same, frozen inside the batch's MySQL transaction, right after
  ``SELECT … FOR UPDATE`` locked the coupon row (a worker stalled mid-transaction).

The crash exits with status 17 (:data:`tests.fault.harness.CRASH_EXIT_CODE`), so a test can
tell the chosen point was reached from any other death.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import aiomysql
from redis.asyncio import Redis

import stream_worker.__main__ as worker_main
from shared.mysql import issue_store
from shared.mysql.issue_store import BatchResult, Entry
from shared.settings import Settings
from stream_worker.worker import Delivered, Worker

CRASH_EXIT_CODE = 17
POINTS = (
    "before_commit",
    "after_commit",
    "mid_ack",
    "pause_before_commit",
    "pause_after_commit",
    "pause_in_transaction",
)


class CrashingWorker(Worker):
    """The production worker with one fault at a chosen point of its first batch."""

    def __init__(self, redis: Redis, pool: aiomysql.Pool, settings: Settings) -> None:
        super().__init__(redis, pool, settings)
        self.at = os.environ["FAULT_CRASH_AT"]
        if self.at not in POINTS:
            raise SystemExit(f"FAULT_CRASH_AT must be one of {POINTS}, got {self.at!r}")
        self._armed = True
        self._exit_after_batch = False
        if self.at == "pause_in_transaction":
            lock_coupons = issue_store._lock_coupons

            async def lock_then_freeze(cur: Any, coupon_ids: Any) -> Any:
                room = await lock_coupons(cur, coupon_ids)
                self._fire("in_transaction")
                return room

            # write_batch looks the helper up in its module at call time.
            issue_store._lock_coupons = lock_then_freeze

    def _fire(self, point: str) -> None:
        if not self._armed or self.at.removeprefix("pause_") != point:
            return
        self._armed = False
        if self.at.startswith("pause_"):
            self._exit_after_batch = True
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            os._exit(CRASH_EXIT_CODE)

    async def _commit(self, entries: list[Entry]) -> BatchResult | None:
        self._fire("before_commit")
        result = await super()._commit(entries)
        self._fire("after_commit")
        return result

    async def _acknowledge(self, result: BatchResult) -> None:
        if self._armed and self.at == "mid_ack":
            issued = result.issued
            half = issued[: len(issued) // 2]
            await super()._acknowledge(BatchResult(inserted=half))
            self._fire("mid_ack")
        await super()._acknowledge(result)

    async def _handle(self, delivered: list[Delivered]) -> None:
        await super()._handle(delivered)
        if self._exit_after_batch:
            self.stop()


if __name__ == "__main__":
    worker_main.Worker = CrashingWorker  # type: ignore[misc]
    worker_main.main()
