"""couponctl's command line: the commands and their options, and what its exit codes mean."""

from __future__ import annotations

import argparse
import importlib.metadata
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DRIFT, EXIT_NOT_FOUND, EXIT_UNREACHABLE = range(6)
EXIT_NOT_READY = 6
EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_FAILED: "refused or failed (a bad value, a conflict, an unexpected error)",
    EXIT_USAGE: "the command line is wrong (argparse)",
    EXIT_DRIFT: "reconcile found drift it was not asked to repair",
    EXIT_NOT_FOUND: "no such coupon (or dead letter, or request)",
    EXIT_UNREACHABLE: "Redis or MySQL cannot be reached",
    EXIT_NOT_READY: "preflight: the drop is not ready",
}
DESCRIPTION = "couponctl: the operator's command line of the coupon drop service."
EPILOG = "exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items())


def _json_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a command's own default must not undo a --json given before the command.
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, not text"
    )


def build_parser() -> argparse.ArgumentParser:
    """couponctl's command line; ``--json`` is accepted before the command and after it."""
    parser = argparse.ArgumentParser(prog="couponctl", description=DESCRIPTION, epilog=EPILOG)
    _json_option(parser)
    parser.add_argument("--version", action="version", version=f"couponctl {_version()}")
    sub = parser.add_subparsers(dest="noun", required=True)
    groups = [*_coupon_commands(sub), *_repair_commands(sub)]
    # --json wherever the user puts it: `couponctl coupon show 1 --json` as well.
    for group in groups:
        for leaf in group.choices.values():
            _json_option(leaf)
    for name in ("status", "preflight", "rebuild", "reconcile", "audit"):
        _json_option(sub.choices[name])
    return parser


def _coupon_commands(sub: Any) -> list[Any]:
    """db and coupon, and status and preflight; returns the subcommand groups."""

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
    export = coupon.add_parser("winners", help="every winner, streamed: CSV or JSON lines")
    export.add_argument("coupon_id", type=int)
    form = export.add_mutually_exclusive_group()
    form.add_argument("--csv", action="store_true", help="CSV with a header line (the default)")
    form.add_argument("--jsonl", action="store_true", help="one JSON object per line")
    for verb, what in (
        ("pause", "stop issuing until resumed"),
        ("resume", "issue again"),
        ("retire", "free a finished coupon's Redis state now (refused while live or unsettled)"),
    ):
        coupon.add_parser(verb, help=what).add_argument("coupon_id", type=int)

    status = sub.add_parser("status", help="a live view of one coupon's counters")
    status.add_argument("coupon_id", type=int)
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    status.add_argument("--count", type=int, default=0, help="stop after N refreshes (0: never)")

    preflight = sub.add_parser(
        "preflight", help="before a drop: check everything it needs (exit 6: not ready)"
    )
    preflight.add_argument("coupon_id", type=int)
    return [database, coupon]


def _repair_commands(sub: Any) -> list[Any]:
    """rebuild, reconcile and dead; returns the subcommand groups."""
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
    audit = sub.add_parser("audit", help="who changed what: the audit log, oldest first")
    audit.add_argument("--coupon", type=int, help="one coupon's changes only")
    audit.add_argument("--after", type=int, default=0, help="entries after this id")
    audit.add_argument("--limit", type=int, default=100)
    return [dead]


def _version() -> str:
    try:
        return importlib.metadata.version("coupon-drop")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
