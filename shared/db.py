"""MySQL connections and schema migrations."""

from __future__ import annotations

import re
import warnings
from importlib import resources
from typing import Any

import aiomysql
import pymysql
import structlog
from pymysql.constants import CLIENT

from shared.settings import MySQLDsn

log = structlog.get_logger(__name__)

# A transaction left open by a process that stopped mid-way (SIGSTOP, a paused VM, a hung host)
# keeps its coupon row locked, and every other worker waits on that lock. MariaDB ends such a
# session after this many idle seconds, releasing the lock; the late process finds its
# connection gone and retries idempotently. Our transactions never sit idle anywhere near this.
IDLE_TRANSACTION_TIMEOUT_SECONDS = 10

# Every timestamp in MySQL is UTC, whatever the server's own zone is. The /*M! ... */ part is
# run by MariaDB only (MySQL has no idle_transaction_timeout and skips it).
_INIT_COMMAND = (
    "SET time_zone = '+00:00'"
    f" /*M!100300 , idle_transaction_timeout = {IDLE_TRANSACTION_TIMEOUT_SECONDS} */"
)

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INT          NOT NULL PRIMARY KEY,
    name       VARCHAR(255) NOT NULL,
    applied_at DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB
"""


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
        init_command=_INIT_COMMAND,
        connect_timeout=5,
        pool_recycle=3600,
        **extra,
    )
    async with pool.acquire() as conn:
        await conn.ping(reconnect=False)
    return pool


def _migration_files() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("shared.migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def _statements(sql: str) -> list[str]:
    """Split a migration file on the semicolons that end a line (our files keep them there)."""
    without_comments = "\n".join(
        line for line in sql.splitlines() if not line.lstrip().startswith("--")
    )
    return [
        part.strip() for part in re.split(r";\s*$", without_comments, flags=re.M) if part.strip()
    ]


async def migrate(dsn: MySQLDsn) -> list[str]:
    """Create the database when missing and apply every migration not yet applied, in order.

    Returns the names of the migrations applied by this call.
    """
    conn = await aiomysql.connect(
        host=dsn.host,
        port=dsn.port,
        user=dsn.user,
        password=dsn.password,
        init_command=_INIT_COMMAND,
        connect_timeout=5,
        autocommit=True,
    )
    applied: list[str] = []
    # "IF NOT EXISTS" on an existing database or table is the normal case, not news.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pymysql.Warning)
        try:
            async with conn.cursor() as cur:
                await cur.execute(
                    f"CREATE DATABASE IF NOT EXISTS `{dsn.database}` CHARACTER SET utf8mb4"
                )
                await conn.select_db(dsn.database)
                await cur.execute(MIGRATIONS_TABLE)
                await cur.execute("SELECT version FROM schema_migrations")
                done = {int(row[0]) for row in await cur.fetchall()}
                for version, name, sql in _migration_files():
                    if version in done:
                        continue
                    for statement in _statements(sql):
                        await cur.execute(statement)
                    await cur.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (version, name),
                    )
                    applied.append(name)
                    log.info("migration_applied", name=name)
        finally:
            conn.close()
    return applied
