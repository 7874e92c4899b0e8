"""``couponctl``: the operator's command line.

    couponctl db migrate
    couponctl coupon create --title T [--total N] [--start ISO] [--end ISO | --minutes N]
    couponctl coupon list [--after ID] [--limit N]
    couponctl coupon show ID
    couponctl coupon update ID [--title T] [--total N | --unlimited] [--start ISO] [--end ISO]
    couponctl coupon pause ID | resume ID
    couponctl status ID [--interval S] [--count N]

Human output by default, ``--json`` for scripts. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomysql
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import coupons, db, redis_client
from shared import logging as shared_logging
from shared.errors import AppError, CouponNotFound
from shared.settings import ConfigError, Settings

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, Any]]

LIST_COLUMNS = ("id", "title", "total_quantity", "issued_quantity", "paused")
STATUS_COLUMNS = ("requested", "issued", "pending", "dead_lettered", "remaining", "rate_per_s")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="couponctl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub = parser.add_subparsers(dest="noun", required=True)

    database = sub.add_parser("db", help="the MySQL schema").add_subparsers(
        dest="verb", required=True
    )
    database.add_parser("migrate", help="create the database if missing and apply migrations")

    coupon = sub.add_parser("coupon", help="coupons").add_subparsers(dest="verb", required=True)
    create = coupon.add_parser("create", help="create a coupon, ready to issue")
    create.add_argument("--title", required=True)
    create.add_argument("--total", type=int, default=None, help="total quantity (omit: unlimited)")
    create.add_argument("--discount", type=int, default=0, help="discount_amount")
    create.add_argument("--min-amount", type=int, default=0, help="min_available_amount")
    create.add_argument("--start", help="ISO-8601 with offset (default: now)")
    create.add_argument("--end", help="ISO-8601 with offset (default: start + --minutes)")
    create.add_argument("--minutes", type=float, default=60.0, help="window length if no --end")
    listing = coupon.add_parser("list", help="coupons in id order")
    listing.add_argument("--after", type=int, default=0, help="show ids above this one")
    listing.add_argument("--limit", type=int, default=100)
    show = coupon.add_parser("show", help="a coupon with its counters")
    show.add_argument("coupon_id", type=int)
    update = coupon.add_parser("update", help="change a coupon live (top up, move the window)")
    update.add_argument("coupon_id", type=int)
    update.add_argument("--title")
    stock = update.add_mutually_exclusive_group()
    stock.add_argument("--total", type=int, help="new total quantity")
    stock.add_argument("--unlimited", action="store_true", help="remove the quantity limit")
    update.add_argument("--start", help="new window start, ISO-8601 with offset")
    update.add_argument("--end", help="new window end, ISO-8601 with offset")
    for verb, what in (("pause", "stop issuing until resumed"), ("resume", "issue again")):
        coupon.add_parser(verb, help=what).add_argument("coupon_id", type=int)

    status = sub.add_parser("status", help="a live view of one coupon's counters")
    status.add_argument("coupon_id", type=int)
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    status.add_argument("--count", type=int, default=0, help="stop after N refreshes (0: never)")
    return parser


@dataclass
class Stores:
    pool: aiomysql.Pool
    redis: Redis


@contextlib.asynccontextmanager
async def _stores(settings: Settings) -> AsyncIterator[Stores]:
    pool = await db.create_pool(settings.mysql, maxsize=1)
    redis = redis_client.connect(settings.redis_url, socket_timeout=5.0)
    try:
        yield Stores(pool, redis)
    finally:
        pool.close()
        await pool.wait_closed()
        await redis.aclose()


def _moment(raw: str, option: str) -> datetime:
    moment = datetime.fromisoformat(raw)
    if moment.tzinfo is None:
        raise AppError(f"{option} needs a UTC offset, e.g. 2026-11-25T13:00:00+09:00")
    return moment


async def _migrate(settings: Settings, args: argparse.Namespace) -> Any:
    applied = await db.migrate(settings.mysql)
    return {"database": settings.mysql.database, "applied": applied}


async def _create(settings: Settings, args: argparse.Namespace) -> Any:
    start = _moment(args.start, "--start") if args.start else datetime.now(UTC)
    end = _moment(args.end, "--end") if args.end else start + timedelta(minutes=args.minutes)
    new = coupons.NewCoupon.from_json(
        {
            "title": args.title,
            "total_quantity": args.total,
            "discount_amount": args.discount,
            "min_available_amount": args.min_amount,
            "date_issue_start": start.isoformat(),
            "date_issue_end": end.isoformat(),
        }
    )
    async with _stores(settings) as stores:
        return (await coupons.create_coupon(stores.pool, stores.redis, new)).public()


async def _list(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        return await coupons.list_coupons(stores.pool, after_id=args.after, limit=args.limit)


async def _coupon_with_counters(stores: Stores, coupon_id: int) -> dict[str, Any]:
    coupon = await coupons.fetch_coupon(stores.pool, coupon_id)
    if coupon is None:
        raise CouponNotFound(f"coupon {coupon_id} does not exist")
    counts = await coupons.counters(stores.pool, stores.redis, coupon)
    return {**coupon.public(), **counts.as_dict()}


async def _show(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        return await _coupon_with_counters(stores, args.coupon_id)


async def _change(settings: Settings, coupon_id: int, body: dict[str, Any]) -> Any:
    change = coupons.CouponChange.from_json(body)
    async with _stores(settings) as stores:
        return (await coupons.update_coupon(stores.pool, stores.redis, coupon_id, change)).public()


async def _update(settings: Settings, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {}
    if args.title is not None:
        body["title"] = args.title
    if args.unlimited:
        body["total_quantity"] = None
    elif args.total is not None:
        body["total_quantity"] = args.total
    if args.start:
        body["date_issue_start"] = _moment(args.start, "--start").isoformat()
    if args.end:
        body["date_issue_end"] = _moment(args.end, "--end").isoformat()
    if not body:
        raise AppError("nothing to change: give --title, --total, --unlimited, --start or --end")
    return await _change(settings, args.coupon_id, body)


async def _pause(settings: Settings, args: argparse.Namespace) -> Any:
    return await _change(settings, args.coupon_id, {"paused": True})


async def _resume(settings: Settings, args: argparse.Namespace) -> Any:
    return await _change(settings, args.coupon_id, {"paused": False})


async def _status(settings: Settings, args: argparse.Namespace) -> None:
    """Refresh the counters every ``--interval`` seconds; the rate is issued rows per second."""
    if args.interval <= 0:
        raise AppError("--interval must be positive")
    async with _stores(settings) as stores:
        previous: tuple[float, int] | None = None
        shown = 0
        while True:
            row = await _coupon_with_counters(stores, args.coupon_id)
            now = time.monotonic()
            rate = None if previous is None else (row["issued"] - previous[1]) / (now - previous[0])
            previous = (now, row["issued"])
            row["rate_per_s"] = None if rate is None else round(rate, 1)
            _show_status(row, json_lines=args.json, first=shown == 0)
            shown += 1
            if args.count and shown >= args.count:
                return
            await asyncio.sleep(args.interval)


def _show_status(row: dict[str, Any], *, json_lines: bool, first: bool) -> None:
    if json_lines:  # one JSON object per refresh (NDJSON), for scripts
        sys.stdout.write(orjson.dumps(row).decode() + "\n")
    else:
        if first:
            print(f"coupon {row['id']} {row['title']!r} (total {_cell(row['total_quantity'])})")
            print(_table_line(("time", *STATUS_COLUMNS)))
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        print(_table_line((stamp, *(_cell(row[c]) for c in STATUS_COLUMNS))))
    sys.stdout.flush()


COMMANDS: dict[tuple[str, str | None], Command] = {
    ("db", "migrate"): _migrate,
    ("coupon", "create"): _create,
    ("coupon", "list"): _list,
    ("coupon", "show"): _show,
    ("coupon", "update"): _update,
    ("coupon", "pause"): _pause,
    ("coupon", "resume"): _resume,
    ("status", None): _status,
}


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _table_line(cells: tuple[str, ...]) -> str:
    return "  ".join(f"{cell:>13}" for cell in cells)


def _print_human(result: Any) -> None:
    if isinstance(result, list):  # a table
        rows = [[_cell(item.get(c)) for c in LIST_COLUMNS] for item in result]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(LIST_COLUMNS)]
        for line in [list(LIST_COLUMNS), *rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    elif isinstance(result, dict):
        width = max((len(str(k)) for k in result), default=0)
        for key, value in result.items():
            print(f"{key:<{width}}  {_cell(value)}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        # Logs go to stderr, so stdout carries only the result (--json output stays parseable).
        shared_logging.configure("console", "warning")
        command = COMMANDS[(args.noun, getattr(args, "verb", None))]
        result: Any = asyncio.run(command(settings, args))
    except KeyboardInterrupt:
        return 0
    except (ConfigError, AppError, ValueError) as exc:
        print(f"couponctl: {exc}", file=sys.stderr)
        return 1
    except (RedisError, OSError) as exc:
        print(f"couponctl: cannot reach a server: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"couponctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if result is None:
        return 0
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
