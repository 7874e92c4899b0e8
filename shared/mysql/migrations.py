"""The MySQL schema: numbered SQL files in ``schema/``, applied once each, in order."""

from __future__ import annotations

import re
import warnings
from importlib import resources

import aiomysql
import pymysql
import structlog

from shared.mysql.pool import INIT_COMMAND
from shared.settings import MySQLDsn

log = structlog.get_logger(__name__)

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INT          NOT NULL PRIMARY KEY,
    name       VARCHAR(255) NOT NULL,
    applied_at DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB
"""


def _migration_files() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("shared.mysql").joinpath("schema").iterdir():
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
        init_command=INIT_COMMAND,
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
