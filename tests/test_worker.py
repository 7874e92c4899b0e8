"""The stream worker's reliability behaviour against real Redis and MariaDB.

Covers redelivery and double claims (F6), poison entries and the delivery limit (F5), coupons
missing in MySQL, the own-pending re-read on restart, a crash between COMMIT and XACK (F2),
stream discovery without a restart, SIGTERM of a worker process, the end of the window (F12),
MySQL's cap as the last guard against a wrong Redis state, and the seed's listener cases
(CouponIssueListenerTest: empty queue, one request, FIFO order).

Settings come from conftest: ``max_deliveries=3``, ``reclaim_idle_ms=200``, ``block_ms=100``,
``discovery_interval_seconds=0.1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import aiomysql
import pytest
from pymysql.constants import CLIENT
from redis.asyncio import Redis

from shared import keys
from shared.mysql import issue_store
from shared.mysql.issue_store import BatchResult, Entry
from shared.mysql.pool import create_pool
from shared.redis.scripts import Scripts
from shared.settings import Settings
from stream_worker.worker import Worker
from tests.helpers import drain, issue, issued_quantity, row_count, wait_for

ROOT = Path(__file__).resolve().parents[1]
DRAIN_WITHIN = 30.0

# A worker whose process dies right after its first COMMIT, before any XACK (F2).
CRASH_AFTER_COMMIT = textwrap.dedent(
    """
    import asyncio, os
    from shared.mysql.pool import create_pool
    from shared.redis import client as redis_client
    from shared.settings import Settings
    from stream_worker.worker import Worker

    class CrashAfterCommit(Worker):
        async def _acknowledge(self, result):
            os._exit(9)

    async def main():
        settings = Settings.from_env()
        redis = redis_client.connect(settings.redis_url, socket_timeout=5.0)
        pool = await create_pool(settings.mysql)
        await CrashAfterCommit(redis, pool, settings).run(burst=True)

    asyncio.run(main())
    """
)

Row = tuple[int, int, str | None, datetime]
"""(id, user_id, request_id, date_issued) of one ``coupon_issues`` row."""


# --- helpers ----------------------------------------------------------------------------------


async def _rows(pool: aiomysql.Pool, coupon_id: int) -> list[Row]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT id, user_id, request_id, date_issued FROM coupon_issues"
            " WHERE coupon_id = %s ORDER BY id",
            (coupon_id,),
        )
        rows = await cur.fetchall()
        await conn.rollback()
    return [(int(i), int(u), r, d) for i, u, r, d in rows]


async def _dead_letter_rows(pool: aiomysql.Pool, coupon_id: int) -> dict[str, tuple[int, str]]:
    """request id -> (user id, reason) from ``coupon_issue_dead_letters``."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT request_id, user_id, reason FROM coupon_issue_dead_letters"
            " WHERE coupon_id = %s",
            (coupon_id,),
        )
        rows = await cur.fetchall()
        await conn.rollback()
    return {str(r): (int(u), str(reason)) for r, u, reason in rows}


async def _pending(redis: Redis, coupon_id: int, consumer: str | None = None) -> list[str]:
    """Entry ids pending in the ``issuers`` group (optionally of one consumer)."""
    stream = keys.CouponKeys(coupon_id).requests
    rows = await redis.xpending_range(
        stream, keys.GROUP, min="-", max="+", count=10_000, consumername=consumer
    )
    return [str(row["message_id"]) for row in rows]


async def _all_pending_idle(redis: Redis, coupon_id: int, idle_ms: int) -> bool:
    """Every pending entry is idle long enough for XAUTOCLAIM to take it."""
    stream = keys.CouponKeys(coupon_id).requests
    rows = await redis.xpending_range(stream, keys.GROUP, min="-", max="+", count=10_000)
    return bool(rows) and all(int(row["time_since_delivered"]) > idle_ms for row in rows)


async def _dead_at_least(redis: Redis, coupon_id: int, count: int) -> bool:
    return await redis.xlen(keys.CouponKeys(coupon_id).dead) >= count


async def _rows_at_least(pool: aiomysql.Pool, coupon_id: int, count: int) -> bool:
    return await row_count(pool, coupon_id) >= count


async def _dead(redis: Redis, coupon_id: int) -> list[dict[str, str]]:
    return [fields for _, fields in await redis.xrange(keys.CouponKeys(coupon_id).dead)]


async def _redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def _enqueue_by_hand(
    redis: Redis, coupon_id: int, user: int | str, *, holds_slot: bool = True, **fields: str
) -> str:
    """XADD an entry the way issue.lua writes it (c, u, t), bypassing the Lua checks.

    ``holds_slot`` also SADDs the user to ``users``, as the script does for an accepted user;
    ``fields`` override c/u/t to make the entry malformed.
    """
    k = keys.CouponKeys(coupon_id)
    if holds_slot:
        await redis.sadd(k.users, str(user))
    entry = {"c": str(coupon_id), "u": str(user), "t": str(await _redis_ms(redis)), **fields}
    return str(await redis.xadd(k.requests, entry))  # type: ignore[arg-type]


async def _read_as(redis: Redis, coupon_id: int, consumer: str) -> list[tuple[str, dict[str, str]]]:
    """XREADGROUP new entries under ``consumer``: a worker that read and then never acked."""
    reply = await redis.xreadgroup(
        keys.GROUP, consumer, {keys.CouponKeys(coupon_id).requests: ">"}, count=1000
    )
    return [(str(i), f) for _, entries in reply for i, f in entries]


async def _status(client: Any, coupon_id: int, user_id: int) -> str:
    response = await client.get(f"/v1/coupons/{coupon_id}/issues/{user_id}")
    assert response.status == 200, await response.text()
    return str((await response.json())["status"])


async def _accept_all(client: Any, coupon_id: int, users: list[int]) -> dict[int, str]:
    """Issue through the gateway, one user after another; user -> request id."""
    accepted = {}
    for user in users:
        status, body = await issue(client, coupon_id, user)
        assert status == 202, body
        accepted[user] = str(body["request_id"])
    return accepted


async def _drain(redis: Redis, pool: aiomysql.Pool, settings: Settings, **changes: Any) -> None:
    """``helpers.drain`` with a deadline: a worker retrying forever fails the test, not hangs it."""
    try:
        await asyncio.wait_for(drain(redis, pool, settings, **changes), DRAIN_WITHIN)
    except TimeoutError:
        raise AssertionError(f"burst worker did not finish within {DRAIN_WITHIN} s") from None


def _holds(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """An in-process condition in the shape ``wait_for`` polls."""

    async def condition() -> bool:
        return check()

    return condition


@contextlib.asynccontextmanager
async def _running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    """Run a (non-burst) worker as a task; stop it and make sure run() returned."""
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)


class _StalledWorker(Worker):
    """A worker whose commits wait for ``release``: one that read a batch, then stalled."""

    def __init__(self, redis: Redis, pool: aiomysql.Pool, settings: Settings) -> None:
        super().__init__(redis, pool, settings)
        self.reached = asyncio.Event()
        self.release = asyncio.Event()
        self.results: list[BatchResult] = []

    async def _commit(self, entries: list[Entry]) -> BatchResult | None:
        self.reached.set()
        await self.release.wait()
        result = await super()._commit(entries)
        if result is not None:
            self.results.append(result)
        return result


Spawn = Callable[..., Awaitable[asyncio.subprocess.Process]]


def _log_file(path: Path) -> IO[bytes]:
    return path.open("wb")


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start worker processes (``python -m stream_worker`` or a script); killed at teardown."""
    started: list[tuple[asyncio.subprocess.Process, IO[bytes]]] = []

    async def start(
        settings: Settings, *args: str, code: str | None = None
    ) -> asyncio.subprocess.Process:
        env = {**os.environ, **settings.replace(log_format="json").to_env()}
        log = _log_file(tmp_path / f"{settings.worker_name}-{len(started)}.log")
        argv = ["-c", code] if code else ["-m", "stream_worker", *args]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        started.append((proc, log))
        return proc

    yield start
    for proc, log in started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


async def _exit_code(proc: asyncio.subprocess.Process, *, within: float) -> int:
    """The process's exit code; fails the test if it is still running after ``within`` s."""
    try:
        return await asyncio.wait_for(proc.wait(), within)
    except TimeoutError:
        raise AssertionError(f"worker process {proc.pid} still running after {within} s") from None


# --- redelivery and double claims (F6) --------------------------------------------------------


async def test_same_entry_written_twice_gives_one_row(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=5)
    await _accept_all(client, coupon.id, [1])
    [(entry_id, fields)] = await redis.xrange(keys.CouponKeys(coupon.id).requests)
    entry = Entry.parse(coupon.id, entry_id, fields)

    first = await issue_store.write_batch(pool, [entry])
    second = await issue_store.write_batch(pool, [entry])

    assert first.inserted == [entry]
    # The second delivery is recognised as done, not an error and not a second row.
    assert second.inserted == []
    assert second.already_issued == [entry]
    assert second.to_dead_letter == []
    assert [r[1] for r in await _rows(pool, coupon.id)] == [1]
    assert await issued_quantity(pool, coupon.id) == 1
    # A worker delivering it a third time only acknowledges it.
    await _drain(redis, pool, settings)
    await check_invariants(coupon, accepted={1})


async def test_a_pool_counting_matched_rows_is_refused(settings):
    # With CLIENT.FOUND_ROWS a redelivered entry would count as a row created (see above).
    with pytest.raises(ValueError, match="FOUND_ROWS"):
        await create_pool(settings.mysql, client_flag=CLIENT.FOUND_ROWS)


async def test_entry_committed_but_unacked_is_reclaimed_without_second_row(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=5)
    accepted = await _accept_all(client, coupon.id, [1, 2, 3])
    # "ghost" reads the entries and commits them, then dies before XACK.
    delivered = await _read_as(redis, coupon.id, "ghost")
    result = await issue_store.write_batch(
        pool, [Entry.parse(coupon.id, i, f) for i, f in delivered]
    )
    assert len(result.inserted) == 3
    assert sorted(await _pending(redis, coupon.id, "ghost")) == sorted(accepted.values())

    # Another worker takes them over once they are idle long enough, and commits again.
    await wait_for(lambda: _all_pending_idle(redis, coupon.id, settings.reclaim_idle_ms))
    await _drain(redis, pool, settings, worker_name="rescuer")

    assert sorted(r[1] for r in await _rows(pool, coupon.id)) == [1, 2, 3]
    assert await issued_quantity(pool, coupon.id) == 3
    assert await _pending(redis, coupon.id) == []
    for user in accepted:
        assert await _status(client, coupon.id, user) == "issued"
    await check_invariants(coupon, accepted=set(accepted))


async def test_two_workers_claiming_same_entries_give_one_row_per_user(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=10)
    users = [1, 2, 3, 4, 5]
    await _accept_all(client, coupon.id, users)
    stalled = _StalledWorker(redis, pool, settings.replace(worker_name="worker-a"))
    async with _running(stalled):
        # Worker A holds all five entries but stalls before its commit.
        await wait_for(_holds(stalled.reached.is_set))
        assert len(await _pending(redis, coupon.id, "worker-a")) == 5
        # Worker B XAUTOCLAIMs them after reclaim_idle_ms, commits and acks.
        await wait_for(lambda: _all_pending_idle(redis, coupon.id, settings.reclaim_idle_ms))
        await _drain(redis, pool, settings, worker_name="worker-b")
        assert sorted(r[1] for r in await _rows(pool, coupon.id)) == users
        # Then A wakes up and commits the same entries: a late, harmless double commit.
        stalled.release.set()
        await wait_for(_holds(lambda: len(stalled.results) == 1))

    late = stalled.results[0]
    assert late.inserted == []
    assert sorted(e.user_id for e in late.already_issued) == users
    assert sorted(r[1] for r in await _rows(pool, coupon.id)) == users
    assert await issued_quantity(pool, coupon.id) == 5
    await check_invariants(coupon, accepted=set(users))


async def test_late_worker_writes_no_row_for_a_request_dead_lettered_meanwhile(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=10)
    await _accept_all(client, coupon.id, [1, 2, 3])
    # "late" reads the three entries (their first delivery) and stalls before its commit.
    delivered = await _read_as(redis, coupon.id, "late")
    entries = [Entry.parse(coupon.id, i, f) for i, f in delivered]
    # Meanwhile another worker gives up on user 2's request, as at the delivery limit.
    decided = await issue_store.dead_letter(pool, [entries[1]], "max_deliveries")
    assert decided.to_dead_letter == [entries[1]]

    # The late commit: entries new to MySQL, but the coupon now has a dead letter, so the
    # write must look before it inserts, and user 2 gets no row.
    late = await issue_store.write_batch(pool, entries)

    assert late.inserted == [entries[0], entries[2]]
    assert late.to_dead_letter == [entries[1]]
    assert sorted(r[1] for r in await _rows(pool, coupon.id)) == [1, 3]
    assert await issued_quantity(pool, coupon.id) == 2
    # A worker takes the pending entries over: acknowledges 1 and 3, releases 2's slot.
    await wait_for(lambda: _all_pending_idle(redis, coupon.id, settings.reclaim_idle_ms))
    await _drain(redis, pool, settings, worker_name="rescuer")
    assert await _status(client, coupon.id, 2) == "failed"
    snap = await check_invariants(coupon, accepted={1, 2, 3})
    assert snap.marked_failed == {2}


async def test_a_read_across_coupons_commits_at_most_a_batch_per_transaction(
    client, redis, pool, settings, make_coupon, check_invariants
):
    # XREADGROUP's COUNT is per stream: one read of three streams returns up to 3 x 2 here.
    settings = settings.replace(batch_size=2)
    coupons = [await make_coupon(total=10) for _ in range(3)]
    accepted = {c.id: await _accept_all(client, c.id, [30, 10, 20]) for c in coupons}
    sizes: list[int] = []

    class Recording(Worker):
        async def _commit(self, entries: list[Entry]) -> BatchResult | None:
            sizes.append(len(entries))
            return await super()._commit(entries)

    await asyncio.wait_for(Recording(redis, pool, settings).run(burst=True), DRAIN_WITHIN)

    assert sum(sizes) == 9
    assert max(sizes) == 2, sizes
    for coupon in coupons:
        rows = await _rows(pool, coupon.id)
        assert [r[1] for r in rows] == [30, 10, 20]  # stream order within each coupon
        await check_invariants(coupon, accepted=set(accepted[coupon.id]))


# --- poison entries and the delivery limit (F5) -----------------------------------------------


async def test_poison_entries_are_dead_lettered_and_their_user_may_ask_again(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=10)
    k = keys.CouponKeys(coupon.id)
    await _accept_all(client, coupon.id, [1])
    # A malformed entry that names a user holding a slot, and one that names no user at all
    # (and holds no slot: issue.lua never writes one), so the full invariant check applies.
    bad_time = await _enqueue_by_hand(redis, coupon.id, 2, t="bogus")
    bad_user = await _enqueue_by_hand(redis, coupon.id, "abc", holds_slot=False)
    await _accept_all(client, coupon.id, [3])

    async with _running(Worker(redis, pool, settings)):
        await wait_for(lambda: _dead_at_least(redis, coupon.id, 2), within=20)

    # The valid neighbours were never blocked by the poison.
    assert sorted(r[1] for r in await _rows(pool, coupon.id)) == [1, 3]
    dead = {f["source_id"]: f for f in await _dead(redis, coupon.id)}
    assert set(dead) == {bad_time, bad_user}
    for fields in dead.values():
        assert fields["reason"] == "malformed"
        assert int(fields["deliveries"]) > settings.max_deliveries
    assert dead[bad_time]["f_u"] == "2"
    assert await _pending(redis, coupon.id) == []  # XACKed
    assert not await redis.sismember(k.users, "2")  # slot released
    assert await redis.sismember(k.failed, "2")
    assert await _status(client, coupon.id, 2) == "failed"

    # The user whose request was lost may ask again, and this time it is issued.
    status, body = await issue(client, coupon.id, 2)
    assert status == 202, body
    await _drain(redis, pool, settings)
    assert await _status(client, coupon.id, 2) == "issued"
    snap = await check_invariants(coupon, accepted={1, 2, 3})
    assert snap.dead_lettered == 2


async def test_entry_with_absurd_time_is_dead_lettered_without_blocking_others(
    client, redis, pool, settings, make_coupon, check_invariants
):
    poisoned = await make_coupon(total=5, title="poisoned")
    healthy = await make_coupon(total=5, title="healthy")
    # A malformed time that Entry.parse lets through: converting it to a datetime raises
    # OSError (EOVERFLOW), which must count as bad data, not as MySQL being unavailable.
    bad = await _enqueue_by_hand(redis, poisoned.id, 2, t=str(10**20))
    await _accept_all(client, healthy.id, [1])

    async with _running(Worker(redis, pool, settings)):
        # Both entries travel in one batch; the poison must not hold up the other coupon.
        await wait_for(lambda: _rows_at_least(pool, healthy.id, 1), within=10)
        await wait_for(lambda: _dead_at_least(redis, poisoned.id, 1), within=10)

    [dead] = await _dead(redis, poisoned.id)
    assert dead["source_id"] == bad
    assert await _status(client, poisoned.id, 2) == "failed"
    await check_invariants(healthy, accepted={1})
    await check_invariants(poisoned, accepted={2})


async def test_entry_of_coupon_missing_in_mysql_is_dead_lettered_after_delivery_limit(
    client, redis, pool, settings, make_coupon
):
    coupon = await make_coupon(total=5)
    k = keys.CouponKeys(coupon.id)
    accepted = await _accept_all(client, coupon.id, [7])
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("DELETE FROM coupons WHERE id = %s", (coupon.id,))
        await conn.commit()

    # First delivery: no coupon row, so the entry is left pending, not given up at once.
    await _drain(redis, pool, settings)
    assert await _pending(redis, coupon.id) == [accepted[7]]
    assert await _dead(redis, coupon.id) == []
    assert await _status(client, coupon.id, 7) == "pending"

    # Past the delivery limit it is dead-lettered and the slot released.
    async with _running(Worker(redis, pool, settings)):
        await wait_for(lambda: _dead_at_least(redis, coupon.id, 1), within=20)

    [dead] = await _dead(redis, coupon.id)
    assert dead["source_id"] == accepted[7]
    assert dead["reason"] == "max_deliveries"
    assert dead["f_u"] == "7"
    assert await _pending(redis, coupon.id) == []
    assert await redis.smembers(k.users) == set()
    assert await redis.smembers(k.failed) == {"7"}
    assert await redis.smembers(k.issued) == set()
    assert await _status(client, coupon.id, 7) == "failed"
    assert await row_count(pool, coupon.id) == 0
    assert await _dead_letter_rows(pool, coupon.id) == {accepted[7]: (7, "max_deliveries")}
    # check_invariants reads coupons.issued_quantity, and the row is gone; the invariants it
    # would check are asserted above instead (no rows, drained, slot released, shown failed).


# --- restarts, crashes and shutdown (F2) ------------------------------------------------------


async def test_worker_rereads_its_own_pending_entries_on_start(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=5)
    accepted = await _accept_all(client, coupon.id, [1, 2, 3])
    # Consumer X read the entries, then its process died before committing anything.
    assert len(await _read_as(redis, coupon.id, "X")) == 3
    # A long reclaim idle time rules out XAUTOCLAIM: only the own-pending re-read can help.
    patient = {"reclaim_idle_ms": 60_000}
    await _drain(redis, pool, settings, worker_name="Y", **patient)
    assert await row_count(pool, coupon.id) == 0
    assert len(await _pending(redis, coupon.id, "X")) == 3

    await _drain(redis, pool, settings, worker_name="X", **patient)

    assert sorted(r[1] for r in await _rows(pool, coupon.id)) == [1, 2, 3]
    assert await _pending(redis, coupon.id) == []
    await check_invariants(coupon, accepted=set(accepted))


async def test_crash_between_commit_and_ack_loses_nothing_and_duplicates_nothing(
    client, redis, pool, settings, make_coupon, check_invariants, spawn
):
    coupon = await make_coupon(total=10)
    accepted = await _accept_all(client, coupon.id, [1, 2, 3, 4, 5])
    crashing = settings.replace(worker_name="crashy")

    proc = await spawn(crashing, code=CRASH_AFTER_COMMIT)
    assert await _exit_code(proc, within=30) == 9
    # Committed in MySQL, never acknowledged in Redis.
    assert await row_count(pool, coupon.id) == 5
    assert len(await _pending(redis, coupon.id, "crashy")) == 5
    assert await redis.smembers(keys.CouponKeys(coupon.id).issued) == set()

    # The restarted worker (same consumer name) settles them without a second row.
    proc = await spawn(crashing, "--burst")
    assert await _exit_code(proc, within=30) == 0

    assert sorted(r[1] for r in await _rows(pool, coupon.id)) == [1, 2, 3, 4, 5]
    await check_invariants(coupon, accepted=set(accepted))


async def test_running_worker_discovers_new_coupon_and_stop_ends_run(
    client, redis, pool, settings, make_coupon, check_invariants
):
    first = await make_coupon(total=5, title="first")
    worker = Worker(redis, pool, settings.replace(worker_name="discoverer"))
    async with _running(worker) as task:
        # The worker is up and reading once it has issued on the coupon it started with.
        await _accept_all(client, first.id, [1])
        await wait_for(lambda: _rows_at_least(pool, first.id, 1))
        later = await make_coupon(total=5, title="later")
        await _accept_all(client, later.id, [1])
        await wait_for(lambda: _rows_at_least(pool, later.id, 1))
        worker.stop()
        await asyncio.wait_for(task, 5)
        assert task.done()
    await check_invariants(later, accepted={1})
    await check_invariants(first, accepted={1})


async def test_sigterm_while_idle_exits_zero(
    redis, pool, settings, make_coupon, check_invariants, spawn
):
    coupon = await make_coupon(total=5)
    await Scripts(redis).reserve(coupon.id, [1])
    proc = await spawn(settings.replace(worker_name="idle-worker"))

    async def settled_and_idle() -> bool:
        assert proc.returncode is None, "worker process exited on its own"
        # Its only entry is committed and acknowledged: the worker has nothing left to do.
        return await row_count(pool, coupon.id) == 1 and not await _pending(redis, coupon.id)

    await wait_for(settled_and_idle, within=30)
    proc.send_signal(signal.SIGTERM)
    assert await _exit_code(proc, within=15) == 0
    await check_invariants(coupon, accepted={1})


async def test_sigterm_under_load_acks_everything_committed(
    redis, pool, settings, make_coupon, check_invariants, spawn
):
    users = list(range(1, 301))
    coupon = await make_coupon(total=len(users))
    outcome = await Scripts(redis).reserve(coupon.id, users)
    assert all(r.request_id for r in outcome.reservations)
    # One row per commit, so the process is mid-stream when the signal arrives.
    proc = await spawn(settings.replace(worker_name="busy-worker", batch_size=1))
    await wait_for(lambda: _rows_at_least(pool, coupon.id, 1), within=30)
    proc.send_signal(signal.SIGTERM)
    assert await _exit_code(proc, within=30) == 0

    # Everything it committed is acknowledged: no row's entry is still pending.
    committed = {r[2] for r in await _rows(pool, coupon.id)}
    assert committed
    assert not committed & set(await _pending(redis, coupon.id))
    await _drain(redis, pool, settings)
    await check_invariants(coupon, accepted=set(users))


# --- window and cap ---------------------------------------------------------------------------


async def test_request_accepted_before_window_end_is_issued_after_it(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=5, end=datetime.now(UTC) + timedelta(seconds=3))
    await _accept_all(client, coupon.id, [1])

    async def window_closed() -> bool:
        return await _redis_ms(redis) >= coupon.end_ms

    await wait_for(window_closed, within=15)
    status, body = await issue(client, coupon.id, 2)
    assert status == 409, body
    assert body["code"] == "INVALID_COUPON_ISSUE_DATE"

    # Consumed after the window closed: the acceptance time counts, not the consume time.
    await _drain(redis, pool, settings)
    [(_, user, _, issued_at)] = await _rows(pool, coupon.id)
    assert user == 1
    assert issued_at.replace(tzinfo=UTC) < coupon.date_issue_end
    assert await _status(client, coupon.id, 1) == "issued"
    await check_invariants(coupon, accepted={1}, rejected={2})


async def test_mysql_cap_holds_when_redis_accepted_too_many(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=3)
    users = [1, 2, 3, 4, 5]
    # Redis state gone wrong: five acceptances for three coupons, written as issue.lua would
    # (slot taken, entry added), so every slot holder is also a stream entry and the full
    # invariant check applies.
    entry_ids = [await _enqueue_by_hand(redis, coupon.id, user) for user in users]

    await _drain(redis, pool, settings)

    # The first three in stream order are issued; the rest are over the cap.
    assert [r[1] for r in await _rows(pool, coupon.id)] == [1, 2, 3]
    assert await issued_quantity(pool, coupon.id) == 3
    dead = await _dead(redis, coupon.id)
    assert sorted((f["source_id"], f["reason"], f["f_u"]) for f in dead) == [
        (entry_ids[3], "over_cap", "4"),
        (entry_ids[4], "over_cap", "5"),
    ]
    assert await _dead_letter_rows(pool, coupon.id) == {
        entry_ids[3]: (4, "over_cap"),
        entry_ids[4]: (5, "over_cap"),
    }
    for user in (4, 5):
        assert await _status(client, coupon.id, user) == "failed"
    snap = await check_invariants(coupon, accepted=set(users))
    assert snap.marked_failed == {4, 5}


# --- the seed's listener cases (CouponIssueListenerTest) --------------------------------------


async def test_empty_stream_gives_no_rows(redis, pool, settings, make_coupon, check_invariants):
    coupon = await make_coupon(total=5)
    await _drain(redis, pool, settings)
    assert await row_count(pool, coupon.id) == 0
    assert await _dead(redis, coupon.id) == []
    await check_invariants(coupon)


async def test_one_request_becomes_one_row_for_that_coupon_and_user(
    client, redis, pool, settings, make_coupon, check_invariants
):
    other = await make_coupon(total=5, title="other")
    coupon = await make_coupon(total=5)
    accepted = await _accept_all(client, coupon.id, [42])
    await _drain(redis, pool, settings)
    [(_, user, request_id, _)] = await _rows(pool, coupon.id)
    assert (user, request_id) == (42, accepted[42])
    assert await row_count(pool, other.id) == 0
    await check_invariants(coupon, accepted={42})
    await check_invariants(other)


async def test_three_requests_become_rows_in_acceptance_order(
    client, redis, pool, settings, make_coupon, check_invariants
):
    coupon = await make_coupon(total=5)
    order = [30, 10, 20]  # not sorted, so the row order can only come from the stream
    accepted = await _accept_all(client, coupon.id, order)
    await _drain(redis, pool, settings)
    rows = await _rows(pool, coupon.id)
    assert [r[1] for r in rows] == order
    assert [r[2] for r in rows] == [accepted[u] for u in order]
    ids, times = [r[0] for r in rows], [r[3] for r in rows]
    assert ids == sorted(set(ids))
    assert times == sorted(times)
    await check_invariants(coupon, accepted=set(order))
