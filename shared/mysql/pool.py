"""MySQL connections: the pool every process uses, and the one way to run a transaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiomysql
from pymysql.constants import CLIENT

from shared.settings import MySQLDsn

# A transaction left open by a process that stopped mid-way (SIGSTOP, a paused VM, a hung host)
# keeps its coupon row locked, and every other worker waits on that lock. MariaDB ends such a
# session after this many idle seconds, releasing the lock; the late process finds its
# connection gone and retries idempotently. Our transactions never sit idle anywhere near this.
IDLE_TRANSACTION_TIMEOUT_SECONDS = 10

# Every timestamp in MySQL is UTC, whatever the server's own zone is. The /*M! ... */ part is
# run by MariaDB only (MySQL has no idle_transaction_timeout and skips it).
INIT_COMMAND = (
    "SET time_zone = '+00:00'"
    f" /*M!100300 , idle_transaction_timeout = {IDLE_TRANSACTION_TIMEOUT_SECONDS} */"
)


async def create_pool(
    dsn: MySQLDsn, *, minsize: int = 1, maxsize: int = 10, **extra: Any
) -> aiomysql.Pool:
    """A pool of autocommit-off connections in UTC; pinged once so bad settings fail at start.

    Never with ``CLIENT.FOUND_ROWS``: the issue store reads an upsert's row count as the rows it
    created, which that flag would turn into the rows it matched.
    """
    if int(extra.get("client_flag", 0)) & CLIENT.FOUND_ROWS:
        raise ValueError("the issue store needs affected-row counts, not CLIENT.FOUND_ROWS")
    pool = await aiomysql.create_pool(
        host=dsn.host,
        port=dsn.port,
        user=dsn.user,
        password=dsn.password,
        db=dsn.database,
        minsize=minsize,
        maxsize=maxsize,
        autocommit=False,
        init_command=INIT_COMMAND,
        connect_timeout=5,
        pool_recycle=3600,
        **extra,
    )
    async with pool.acquire() as conn:
        await conn.ping(reconnect=False)
    return pool


@asynccontextmanager
async def transaction(
    pool: aiomysql.Pool, cursor_class: type[aiomysql.Cursor] = aiomysql.Cursor
) -> AsyncIterator[aiomysql.Cursor]:
    """A cursor in one transaction: committed when the block ends, rolled back if it raises.

    No ``BEGIN``: the connections run with autocommit off, so the first statement opens the
    transaction (one round trip fewer). A rollback that fails is ignored: the connection is
    broken, the pool drops it, and the block's own error is the one worth raising.
    """
    async with pool.acquire() as conn:
        try:
            async with conn.cursor(cursor_class) as cur:
                yield cur
            await conn.commit()
        except BaseException:
            await _rollback_quietly(conn)
            raise


@asynccontextmanager
async def snapshot(
    pool: aiomysql.Pool, cursor_class: type[aiomysql.Cursor] = aiomysql.Cursor
) -> AsyncIterator[aiomysql.Cursor]:
    """A cursor for reads only; the transaction its reads opened is rolled back at the end, so
    a pooled connection never holds an old snapshot (or a lock) while it waits for reuse."""
    async with pool.acquire() as conn:
        try:
            async with conn.cursor(cursor_class) as cur:
                yield cur
        finally:
            await _rollback_quietly(conn)


# A health probe's patience with MySQL: a probe must answer well within its own timeout.
PING_TIMEOUT_SECONDS = 1.0


async def answers(pool: aiomysql.Pool) -> bool:
    """Whether MySQL answers a ping within :data:`PING_TIMEOUT_SECONDS` (the health probes):
    any failure, a refused connection as a frozen server, is "no"."""
    try:
        async with asyncio.timeout(PING_TIMEOUT_SECONDS):
            async with pool.acquire() as conn:
                await conn.ping(reconnect=True)
    except Exception:  # any failure means "not answering"
        return False
    return True


async def _rollback_quietly(conn: aiomysql.Connection) -> None:
    try:
        await conn.rollback()
    except Exception:  # noqa: S110 - the connection is broken; the pool drops it
        pass
