"""``couponctl``: the operator's command line.

    couponctl db migrate
    couponctl coupon create --title T [--total N] [--start ISO] [--end ISO | --minutes N]
                            [--idempotency-key KEY]
    couponctl coupon list [--after ID] [--limit N]
    couponctl coupon show ID
    couponctl coupon update ID [--title T] [--total N | --unlimited] [--start ISO] [--end ISO]
    couponctl coupon pause ID | resume ID
    couponctl status ID [--interval S] [--count N]
    couponctl rebuild ID | --all
    couponctl reconcile [ID] [--repair] [--metrics-file PATH]
    couponctl dead list ID | replay ID [ENTRY...] | release ID ENTRY

Human output by default, ``--json`` for scripts. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomysql
import orjson
from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from redis.asyncio import Redis
from redis.exceptions import RedisError
from tqdm import tqdm

from shared import keys
from shared import logging as shared_logging
from shared.coupon_requests import CouponChange, NewCoupon, idempotency_key
from shared.errors import AppError
from shared.mysql import coupon_rows
from shared.mysql.migrations import migrate
from shared.mysql.pool import create_pool
from shared.ops import coupons, dead_letters, rebuild, reconcile
from shared.redis import client as redis_client
from shared.settings import ConfigError, Settings

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, Any]]

LIST_COLUMNS = ("id", "title", "total_quantity", "issued_quantity", "paused")
RECONCILE_COLUMNS = ("coupon_id", *reconcile.CLASSES, "repaired")
DEAD_COLUMNS = ("entry_id", "source_id", "user_id", "reason", "deliveries", "user_status")
COLUMNS: dict[tuple[str, str | None], tuple[str, ...]] = {
    ("coupon", "list"): LIST_COLUMNS,
    ("reconcile", None): RECONCILE_COLUMNS,
    ("dead", "list"): DEAD_COLUMNS,
}
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
    create.add_argument(
        "--idempotency-key",
        help="repeat a create safely: the same key and options give the same coupon, never a"
        " second (needs --start; default: a new key per run)",
    )
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
    rebuild = sub.add_parser("rebuild", help="restore Redis state from MySQL after a data loss")
    which = rebuild.add_mutually_exclusive_group(required=True)
    which.add_argument("coupon_id", type=int, nargs="?", help="one coupon (reopens it at once)")
    which.add_argument("--all", action="store_true", help="every coupon, then mark Redis whole")

    reconcile = sub.add_parser("reconcile", help="compare Redis with MySQL, report drift")
    reconcile.add_argument("coupon_id", type=int, nargs="?", help="one coupon (default: all)")
    reconcile.add_argument("--repair", action="store_true", help="fix the drift found")
    reconcile.add_argument(
        "--metrics-file", help="write the drift as Prometheus text (node_exporter textfile)"
    )

    dead = sub.add_parser("dead", help="dead letters").add_subparsers(dest="verb", required=True)
    dead.add_parser("list", help="dead letters of a coupon").add_argument("coupon_id", type=int)
    replay = dead.add_parser("replay", help="queue dead letters again (all, or those named)")
    replay.add_argument("coupon_id", type=int)
    replay.add_argument("entry_ids", nargs="*", metavar="ENTRY")
    release = dead.add_parser("release", help="dead-letter a stuck pending request now")
    release.add_argument("coupon_id", type=int)
    release.add_argument("entry_id", metavar="ENTRY")
    return parser


@dataclass
class Stores:
    pool: aiomysql.Pool
    redis: Redis


@contextlib.asynccontextmanager
async def _stores(settings: Settings) -> AsyncIterator[Stores]:
    pool = await create_pool(settings.mysql, maxsize=1)
    redis = redis_client.connect(
        settings.redis_url, socket_timeout=5.0, cluster=settings.redis_cluster
    )
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
    applied = await migrate(settings.mysql)
    return {"database": settings.mysql.database, "applied": applied}


async def _create(settings: Settings, args: argparse.Namespace) -> Any:
    if args.idempotency_key is not None and not args.start:
        # "now" differs on every run, so a repeat would be another request under the same key.
        raise AppError("--idempotency-key needs --start, so that a repeat is the same request")
    key = idempotency_key(args.idempotency_key or str(uuid.uuid4()))
    start = _moment(args.start, "--start") if args.start else datetime.now(UTC)
    end = _moment(args.end, "--end") if args.end else start + timedelta(minutes=args.minutes)
    new = NewCoupon.from_json(
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
        coupon, _ = await coupons.create_coupon_once(stores.pool, stores.redis, new, key)
        return coupon.public()


async def _list(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        return await coupons.list_coupons(stores.pool, after_id=args.after, limit=args.limit)


async def _show(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        return await coupons.show_coupon(stores.pool, stores.redis, args.coupon_id)


async def _change(settings: Settings, coupon_id: int, body: dict[str, Any]) -> Any:
    change = CouponChange.from_json(body)
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
            row = await coupons.show_coupon(stores.pool, stores.redis, args.coupon_id)
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


async def _rebuild(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        if args.all:
            reports = await rebuild.rebuild_all(stores.pool, stores.redis)
        else:
            reports = [await rebuild.rebuild_coupon(stores.pool, stores.redis, args.coupon_id)]
    return [dataclasses.asdict(report) for report in reports]


async def _reconcile(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        if args.coupon_id is not None:
            ids = [args.coupon_id]
        else:
            ids = await coupon_rows.coupon_ids(stores.pool)
        drifts = []
        for coupon_id in ids:
            length = int(await stores.redis.xlen(keys.CouponKeys(coupon_id).requests))
            # The bar goes to stderr and only on a terminal, so --json output stays clean.
            with tqdm(
                total=length, desc=f"coupon {coupon_id}", unit="entry", disable=None, leave=False
            ) as bar:
                drifts.append(
                    await reconcile.reconcile(
                        stores.pool,
                        stores.redis,
                        coupon_id,
                        repair=args.repair,
                        progress=bar.update,
                    )
                )
    if args.metrics_file:
        _write_drift_metrics(args.metrics_file, drifts)
    rows = [
        {"coupon_id": d.coupon_id, **d.counts(), "repaired": d.repaired, "details": d.found}
        for d in drifts
    ]
    if any(d.total and not d.repaired for d in drifts):
        # Drift is a finding, not a crash: the report is printed and the exit code says so.
        _print_result(rows, as_json=args.json, columns=RECONCILE_COLUMNS)
        raise DriftFound(f"drift found in {sum(1 for d in drifts if d.total)} coupon(s)")
    return rows


def _write_drift_metrics(path: str, drifts: list[reconcile.Drift]) -> None:
    registry = CollectorRegistry()
    gauge = Gauge(
        "coupon_reconcile_drift",
        "Drift between Redis and MySQL found by the last reconcile run, by class.",
        ["drift_class"],
        registry=registry,
    )
    for name in reconcile.CLASSES:
        gauge.labels(name).set(sum(d.counts()[name] for d in drifts))
    Gauge(
        "coupon_reconcile_last_run_timestamp_seconds",
        "When the last reconcile run finished.",
        registry=registry,
    ).set_to_current_time()
    write_to_textfile(path, registry)


async def _dead_list(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        return await dead_letters.list_dead(stores.redis, args.coupon_id)


async def _dead_replay(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        return await dead_letters.replay(stores.redis, args.coupon_id, args.entry_ids or None)


async def _dead_release(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        outcome = await dead_letters.release_pending(
            stores.pool, stores.redis, args.coupon_id, args.entry_id
        )
    return {"coupon_id": args.coupon_id, "entry_id": args.entry_id, "result": outcome}


COMMANDS: dict[tuple[str, str | None], Command] = {
    ("db", "migrate"): _migrate,
    ("coupon", "create"): _create,
    ("coupon", "list"): _list,
    ("coupon", "show"): _show,
    ("coupon", "update"): _update,
    ("coupon", "pause"): _pause,
    ("coupon", "resume"): _resume,
    ("status", None): _status,
    ("rebuild", None): _rebuild,
    ("reconcile", None): _reconcile,
    ("dead", "list"): _dead_list,
    ("dead", "replay"): _dead_replay,
    ("dead", "release"): _dead_release,
}


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _table_line(cells: tuple[str, ...]) -> str:
    return "  ".join(f"{cell:>13}" for cell in cells)


class DriftFound(Exception):
    """``reconcile`` found drift and was not asked to repair it (exit code 3)."""


def _print_result(result: Any, *, as_json: bool, columns: tuple[str, ...] | None = None) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_human(result, columns)


def _print_human(result: Any, columns: tuple[str, ...] | None = None) -> None:
    if isinstance(result, list):  # a table
        if columns is None:
            columns = tuple(result[0]) if result else LIST_COLUMNS
        rows = [[_cell(item.get(c)) for c in columns] for item in result]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        for line in [list(columns), *rows]:
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
        shared_logging.report_unknown_settings()
        command = COMMANDS[(args.noun, getattr(args, "verb", None))]
        result: Any = asyncio.run(command(settings, args))
    except KeyboardInterrupt:
        return 0
    except DriftFound as exc:
        print(f"couponctl: {exc} (run with --repair to fix it)", file=sys.stderr)
        return 3
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
    columns = COLUMNS.get((args.noun, getattr(args, "verb", None)))
    _print_result(result, as_json=args.json, columns=columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
