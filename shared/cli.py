"""``couponctl``: the operator's command line.

    couponctl db migrate
    couponctl coupon create --title T --total 100 [--start ISO] [--end ISO | --minutes N]
    couponctl coupon show ID

Human output by default, ``--json`` for scripts. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from redis.exceptions import RedisError

from shared import coupons, db, redis_client
from shared import logging as shared_logging
from shared.errors import AppError
from shared.settings import ConfigError, Settings

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, Any]]


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
    show = coupon.add_parser("show", help="a coupon with its counters")
    show.add_argument("coupon_id", type=int)
    return parser


async def _migrate(settings: Settings, args: argparse.Namespace) -> Any:
    applied = await db.migrate(settings.mysql)
    return {"database": settings.mysql.database, "applied": applied}


async def _create(settings: Settings, args: argparse.Namespace) -> Any:
    start = datetime.fromisoformat(args.start) if args.start else datetime.now(UTC)
    if start.tzinfo is None:
        raise AppError("--start needs a UTC offset")
    end = datetime.fromisoformat(args.end) if args.end else start + timedelta(minutes=args.minutes)
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
    pool = await db.create_pool(settings.mysql, maxsize=1)
    redis = redis_client.connect(settings.redis_url, socket_timeout=5.0)
    try:
        return (await coupons.create_coupon(pool, redis, new)).public()
    finally:
        pool.close()
        await pool.wait_closed()
        await redis.aclose()


async def _show(settings: Settings, args: argparse.Namespace) -> Any:
    pool = await db.create_pool(settings.mysql, maxsize=1)
    redis = redis_client.connect(settings.redis_url, socket_timeout=5.0)
    try:
        coupon = await coupons.fetch_coupon(pool, args.coupon_id)
        if coupon is None:
            raise AppError(f"coupon {args.coupon_id} does not exist")
        counts = await coupons.counters(pool, redis, coupon)
        return {**coupon.public(), **counts.as_dict()}
    finally:
        pool.close()
        await pool.wait_closed()
        await redis.aclose()


COMMANDS: dict[tuple[str, str], Command] = {
    ("db", "migrate"): _migrate,
    ("coupon", "create"): _create,
    ("coupon", "show"): _show,
}


def _print_human(result: Any) -> None:
    if isinstance(result, dict):
        width = max((len(str(k)) for k in result), default=0)
        for key, value in result.items():
            print(f"{key:<{width}}  {'-' if value is None else value}")
    else:
        print(result)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        # Logs go to stderr, so stdout carries only the result (--json output stays parseable).
        shared_logging.configure("console", "warning")
        result: Any = asyncio.run(COMMANDS[(args.noun, args.verb)](settings, args))
    except (ConfigError, AppError, ValueError) as exc:
        print(f"couponctl: {exc}", file=sys.stderr)
        return 1
    except (RedisError, OSError) as exc:
        print(f"couponctl: cannot reach a server: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"couponctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
