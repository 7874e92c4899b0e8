"""How couponctl prints: tables for people, JSON for scripts."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from shared.ops import reconcile

LIST_COLUMNS = ("id", "title", "total_quantity", "issued_quantity", "paused")
RECONCILE_COLUMNS = ("coupon_id", *reconcile.CLASSES, "repaired")
DEAD_COLUMNS = ("entry_id", "source_id", "user_id", "reason", "deliveries", "user_status")
AUDIT_COLUMNS = ("id", "at", "actor", "origin", "action", "coupon_id", "before", "after")
COLUMNS: dict[tuple[str, str | None], tuple[str, ...]] = {
    ("coupon", "list"): LIST_COLUMNS,
    ("audit", None): AUDIT_COLUMNS,
    ("reconcile", None): RECONCILE_COLUMNS,
    ("dead", "list"): DEAD_COLUMNS,
}
STATUS_COLUMNS = ("requested", "issued", "pending", "dead_lettered", "remaining", "rate_per_s")


def _cell(value: Any) -> str:
    if isinstance(value, dict | list):  # the audit log's before and after: compact JSON
        return orjson.dumps(value).decode()
    return "-" if value is None else str(value)


def _table_line(cells: tuple[str, ...]) -> str:
    return "  ".join(f"{cell:>13}" for cell in cells)


def print_result(result: Any, *, as_json: bool, columns: tuple[str, ...] | None = None) -> None:
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


def show_status(row: dict[str, Any], *, json_lines: bool, first: bool) -> None:
    if json_lines:  # one JSON object per refresh (NDJSON), for scripts
        sys.stdout.write(orjson.dumps(row).decode() + "\n")
    else:
        if first:
            print(f"coupon {row['id']} {row['title']!r} (total {_cell(row['total_quantity'])})")
            print(_table_line(("time", *STATUS_COLUMNS)))
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        print(_table_line((stamp, *(_cell(row[c]) for c in STATUS_COLUMNS))))
    sys.stdout.flush()


PREFLIGHT_STATUS = {"ok": "ok", "warn": "warn", "fail": "FAIL"}


def show_preflight(report: dict[str, Any], *, as_json: bool) -> None:
    """One line per check (name, ok / warn / FAIL, detail), then the verdict."""
    if as_json:
        print_result(report, as_json=True)
        return
    checks = report["checks"]
    width = max((len(check["name"]) for check in checks), default=0)
    for check in checks:
        status = PREFLIGHT_STATUS[check["status"]]
        print(f"{check['name']:<{width}}  {status:<4}  {check['detail']}")
    failed = [check["name"] for check in checks if check["status"] == "fail"]
    if failed:
        print(f"not ready: {', '.join(failed)} failed")
    else:
        print(f"ready: coupon {report['coupon_id']}'s drop can start")
