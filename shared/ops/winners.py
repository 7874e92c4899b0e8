"""The winners of a coupon, straight from MySQL, as CSV or JSON lines, a page at a time.

Rows are read through an unbuffered cursor (``SSCursor``): the server sends them as they are
read, so 100,000 winners never sit in memory at once, on the server or here. A reader that
stops early (a client gone) closes the connection instead of reading the rest of the result.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime

import aiomysql
import orjson

from shared.errors import CouponNotFound
from shared.mysql import coupon_rows

COLUMNS = ("user_id", "request_id", "date_issued", "date_created")
PAGE = 1000
FORMATS = ("csv", "jsonl")


Row = tuple[int, str | None, datetime, datetime]
"""(user_id, request_id, date_issued, date_created) of one ``coupon_issues`` row."""


async def winners(pool: aiomysql.Pool, coupon_id: int) -> AsyncGenerator[Row, None]:
    """The coupon's winners in the order their rows were made. Raises :class:`CouponNotFound`
    here, before any row is read, so a caller can still answer 404. A caller that stops early
    must ``aclose()`` it, which gives the connection back (closed)."""
    if await coupon_rows.fetch_coupon(pool, coupon_id) is None:
        raise CouponNotFound(f"coupon {coupon_id} does not exist")
    return _rows(pool, coupon_id)


async def _rows(pool: aiomysql.Pool, coupon_id: int) -> AsyncGenerator[Row, None]:
    async with pool.acquire() as conn:
        finished = False
        try:
            async with conn.cursor(aiomysql.SSCursor) as cur:
                await cur.execute(
                    "SELECT user_id, request_id, date_issued, date_created FROM coupon_issues"
                    " WHERE coupon_id = %s ORDER BY id",
                    (coupon_id,),
                )
                while rows := await cur.fetchmany(PAGE):
                    for row in rows:
                        yield row
            finished = True
            await conn.rollback()
        finally:
            if not finished:
                # Left mid-result: the rest would have to be read off the socket first.
                conn.close()


def _iso(moment: datetime) -> str:
    return moment.replace(tzinfo=UTC).isoformat(timespec="microseconds")


async def encoded(rows: AsyncIterator[Row], fmt: str) -> AsyncIterator[bytes]:
    """``rows`` as CSV (a header line first) or JSON lines, ``PAGE`` rows per chunk."""
    if fmt == "csv":
        yield (",".join(COLUMNS) + "\r\n").encode()
    chunk: list[bytes] = []
    async for user_id, request_id, issued, created in rows:
        values = (user_id, request_id, _iso(issued), _iso(created))
        chunk.append(_csv_line(values) if fmt == "csv" else _json_line(values))
        if len(chunk) == PAGE:
            yield b"".join(chunk)
            chunk = []
    if chunk:
        yield b"".join(chunk)


def _csv_line(values: tuple[object, ...]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(["" if value is None else value for value in values])
    return out.getvalue().encode()


def _json_line(values: tuple[object, ...]) -> bytes:
    return orjson.dumps(dict(zip(COLUMNS, values, strict=True))) + b"\n"
