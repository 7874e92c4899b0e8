"""``couponctl``: the operator's command line.

    couponctl db migrate
    couponctl coupon create --title T [--total N] [--start ISO] [--end ISO | --minutes N]
                            [--idempotency-key KEY]
    couponctl coupon list [--after ID] [--limit N]
    couponctl coupon show ID
    couponctl coupon winners ID [--csv | --jsonl]
    couponctl coupon update ID [--title T] [--total N | --unlimited] [--start ISO] [--end ISO]
    couponctl coupon pause ID | resume ID | retire ID
    couponctl status ID [--interval S] [--count N]
    couponctl preflight ID
    couponctl rebuild ID | --all
    couponctl reconcile [ID] [--repair] [--metrics-file PATH]
    couponctl dead list ID | replay ID [ENTRY...] | release ID ENTRY
    couponctl audit [--coupon ID] [--after N] [--limit N]

Human output by default, ``--json`` (before or after the command) for scripts. Errors print one
line; the exit code says which kind (``shared/ops/cli/parser.py``, ``EXIT_CODES``).
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
from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from redis.asyncio import Redis
from redis.exceptions import RedisError
from tqdm import tqdm

from shared import keys
from shared import logging as shared_logging
from shared.coupon_requests import CouponChange, NewCoupon, idempotency_key
from shared.errors import AppError
from shared.mysql import coupon_rows
from shared.mysql.issue_store import is_transient
from shared.mysql.migrations import migrate
from shared.mysql.pool import create_pool
from shared.ops import (
    audit,
    coupons,
    dead_letters,
    preflight,
    rebuild,
    reconcile,
    retire,
    winners,
)
from shared.ops.audit import Actor
from shared.ops.cli import output
from shared.ops.cli.parser import (
    EXIT_DRIFT,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_NOT_READY,
    EXIT_OK,
    EXIT_UNREACHABLE,
    build_parser,
)
from shared.redis import client as redis_client
from shared.settings import ConfigError, Settings

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, Any]]


@dataclass
class Stores:
    pool: aiomysql.Pool
    redis: Redis


@contextlib.asynccontextmanager
async def _stores(settings: Settings) -> AsyncIterator[Stores]:
    pool = await create_pool(settings.mysql, maxsize=1)
    redis = redis_client.for_settings(settings, socket_timeout=5.0)
    try:
        yield Stores(pool, redis)
    finally:
        pool.close()
        await pool.wait_closed()
        await redis.aclose()


def _operator(settings: Settings) -> Actor:
    """Who the audit log records for this run's changes (COUPON_OPERATOR, else the login)."""
    return Actor.operator(settings.operator)


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
        coupon, _ = await coupons.create_coupon_once(
            stores.pool, stores.redis, new, key, actor=_operator(settings)
        )
        return coupon.public()


async def _list(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        return await coupons.list_coupons(stores.pool, after_id=args.after, limit=args.limit)


async def _show(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        return await coupons.show_coupon(stores.pool, stores.redis, args.coupon_id)


async def _winners(settings: Settings, args: argparse.Namespace) -> None:
    """Streams to stdout as MySQL sends the rows; nothing is held in memory."""
    fmt = "jsonl" if args.jsonl or args.json else "csv"
    async with _stores(settings) as stores:
        rows = await winners.winners(stores.pool, args.coupon_id)
        try:
            async for chunk in winners.encoded(rows, fmt):
                sys.stdout.buffer.write(chunk)
        finally:
            await rows.aclose()
    sys.stdout.flush()


async def _change(settings: Settings, coupon_id: int, body: dict[str, Any]) -> Any:
    change = CouponChange.from_json(body)
    async with _stores(settings) as stores:
        updated = await coupons.update_coupon(
            stores.pool, stores.redis, coupon_id, change, actor=_operator(settings)
        )
        return updated.public()


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


async def _retire(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        done = await retire.retire_coupon(
            stores.pool, stores.redis, args.coupon_id, actor=_operator(settings)
        )
    return dataclasses.asdict(done)


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
            output.show_status(row, json_lines=args.json, first=shown == 0)
            shown += 1
            if args.count and shown >= args.count:
                return
            await asyncio.sleep(args.interval)


async def _preflight(settings: Settings, args: argparse.Namespace) -> None:
    """Read-only; the report is printed whatever it says, and the exit code says "ready"."""
    async with _stores(settings) as stores:
        report = await preflight.preflight(stores.pool, stores.redis, args.coupon_id)
    output.show_preflight(report.as_dict(), as_json=args.json)
    if not report.ready:
        raise NotReady(
            f"preflight: coupon {args.coupon_id} is not ready ({', '.join(report.failed)} failed)"
        )


async def _rebuild(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        if args.all:
            reports = await rebuild.rebuild_all(
                stores.pool, stores.redis, actor=_operator(settings)
            )
        else:
            reports = [
                await rebuild.rebuild_coupon(
                    stores.pool, stores.redis, args.coupon_id, actor=_operator(settings)
                )
            ]
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
                        actor=_operator(settings),
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
        output.print_result(rows, as_json=args.json, columns=output.RECONCILE_COLUMNS)
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


async def _audit(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        return await audit.entries(
            stores.pool, coupon_id=args.coupon, after_id=args.after, limit=args.limit
        )


async def _dead_list(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        return await dead_letters.list_dead(stores.redis, args.coupon_id)


async def _dead_replay(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        return await dead_letters.replay(
            stores.pool,
            stores.redis,
            args.coupon_id,
            args.entry_ids or None,
            actor=_operator(settings),
        )


async def _dead_release(settings: Settings, args: argparse.Namespace) -> Any:
    async with _stores(settings) as stores:
        outcome = await dead_letters.release_pending(
            stores.pool, stores.redis, args.coupon_id, args.entry_id, actor=_operator(settings)
        )
    return {"coupon_id": args.coupon_id, "entry_id": args.entry_id, "result": outcome}


COMMANDS: dict[tuple[str, str | None], Command] = {
    ("db", "migrate"): _migrate,
    ("coupon", "create"): _create,
    ("coupon", "list"): _list,
    ("coupon", "show"): _show,
    ("coupon", "winners"): _winners,
    ("coupon", "update"): _update,
    ("coupon", "pause"): _pause,
    ("coupon", "resume"): _resume,
    ("coupon", "retire"): _retire,
    ("status", None): _status,
    ("preflight", None): _preflight,
    ("rebuild", None): _rebuild,
    ("reconcile", None): _reconcile,
    ("dead", "list"): _dead_list,
    ("dead", "replay"): _dead_replay,
    ("dead", "release"): _dead_release,
    ("audit", None): _audit,
}


class DriftFound(Exception):
    """``reconcile`` found drift and was not asked to repair it (exit code 3)."""


class NotReady(Exception):
    """``preflight`` found a check that failed: the drop cannot start (exit code 6)."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    try:
        settings = Settings.from_env()
        # Logs go to stderr, so stdout carries only the result (--json output stays parseable).
        shared_logging.configure("console", "warning")
        shared_logging.report_unknown_settings()
        command = COMMANDS[(args.noun, getattr(args, "verb", None))]
        result: Any = asyncio.run(command(settings, args))
    except KeyboardInterrupt:
        return EXIT_OK
    except DriftFound as exc:
        print(f"couponctl: {exc} (run with --repair to fix it)", file=sys.stderr)
        return EXIT_DRIFT
    except NotReady as exc:
        print(f"couponctl: {exc}", file=sys.stderr)
        return EXIT_NOT_READY
    except AppError as exc:
        print(f"couponctl: {exc}", file=sys.stderr)
        return {404: EXIT_NOT_FOUND, 503: EXIT_UNREACHABLE}.get(exc.status, EXIT_FAILED)
    except (ConfigError, ValueError) as exc:
        print(f"couponctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (RedisError, OSError) as exc:
        print(f"couponctl: cannot reach a server: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except Exception as exc:
        if is_transient(exc):  # MySQL: cannot connect, gone away, ...
            print(f"couponctl: cannot reach a server: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"couponctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result is None:
        return EXIT_OK
    columns = output.COLUMNS.get((args.noun, getattr(args, "verb", None)))
    output.print_result(result, as_json=args.json, columns=columns)
    return EXIT_OK

