"""Smoke runs of ./scripts/bench --quick and a tiny ./scripts/loadtest: they work end to end,
report what they claim, find the invariants intact, and leave no process behind.

These are not performance tests: no number is compared with a threshold, only checked to exist.
Each script starts its own Redis, MariaDB, gateways and workers (on free ports), so these take
some seconds each.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.helpers import REPO


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    return subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _assert_all_stopped(processes: list[dict[str, Any]]) -> None:
    """No process the script started is still running (a reused pid runs something else)."""
    assert processes
    for process in processes:
        cmdline = Path(f"/proc/{process['pid']}/cmdline")
        try:
            running = cmdline.read_bytes().split(b"\0")[:-1]
        except (FileNotFoundError, ProcessLookupError):
            continue
        assert [part.decode() for part in running] != process["argv"], f"left running: {process}"


FEED_GOALS = {"feed_accept_with_vs_without", "feed_sold_out_with_vs_without", "feed_told_p99_ms"}


def _assert_feed_measured(feed: dict[str, Any]) -> None:
    """The live feed part: every rate measured with and without the subscribers, and every
    subscriber of every drop told ``sold_out`` (none cut off), with its latency counted."""
    subscribers = feed["profile"]["subscribers"]
    assert subscribers == 50
    assert set(feed["rates"]) == {"accept", "accept_elsewhere", "sold_out"}
    for name, rate in feed["rates"].items():
        assert rate["with_rps"] > 0, name
        assert rate["without_rps"] > 0, name
        assert len(rate["per_round"]) == feed["profile"]["rounds"], name
    assert all(h["lost"] == 0 and h["refused"] == 0 for h in feed["held"]), feed["held"]
    assert len(feed["drops"]) == feed["profile"]["rounds"]
    for drop in feed["drops"]:
        assert drop["subscribers"] == drop["told"] == subscribers, drop
        assert drop["lost"] == 0, drop
        assert drop["sold"] == feed["profile"]["drop_stock"], drop  # Redis's count
        assert 0 <= drop["first_ms"] <= drop["p50_ms"] <= drop["p99_ms"] <= drop["max_ms"], drop
    told = feed["told"]
    assert told["every_one_told"]
    assert told["subscribers"] == subscribers
    assert 0 <= told["p50_ms"] <= told["p99_ms"] <= told["max_ms"]


def test_bench_quick_prints_the_table_and_writes_results(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    done = _run([str(REPO / "scripts" / "bench"), "--quick", "--output", str(output)], 400)
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("bare aiohttp JSON endpoint", "gateway accept", "naive, one EVALSHA",
                "sold-out fast path", "sync POST /v1/issue", "raw 500-row INSERTs",
                "worker drain", "one row per transaction", "end to end"):  # fmt: skip
        assert row in done.stdout
    results = json.loads(output.read_text())
    for name, scenario in results["http"]["scenarios"].items():
        assert scenario["rps"] > 0, name
        assert scenario["requests"] > 0, name
    # The naive variant really makes one script call per request; coalescing makes fewer.
    scenarios = results["http"]["scenarios"]
    assert 0.95 <= scenarios["naive"]["evalsha_per_request"] <= 1.05
    assert scenarios["accept"]["evalsha_per_request"] <= 1.0
    assert all(check["ok"] for check in results["drain"]["invariants"])
    e2e = results["e2e"]["invariants"]
    assert e2e["ok"]
    assert e2e["headline"] == "100 issued of 100, 0 duplicates, 0 lost"
    # Time to issue, from the rows and from the workers' histogram, counts every row once.
    waits = results["e2e"]["time_to_issue"]
    assert waits["rows"] == 100
    assert waits["metric"]["rows"] == 100
    assert 0 <= waits["p50_s"] <= waits["p99_s"] <= waits["max_s"]
    # The scaling table drained every cell, each with its invariants checked.
    cells = results["scaling"]["cells"]
    assert [(c["coupons"], c["workers"]) for c in cells] == [(1, 1), (1, 2), (10, 1), (10, 2)]
    assert all(c["rows"] == 2_000 and c["rows_per_s"] > 0 for c in cells)
    assert "drain, 2 worker process(es), 10 coupon(s)" in done.stdout
    burst_goals = {
        f"burst_{route}_{name}"
        for route in ("native", "seed")
        for name in ("failed_pct", "rps_vs_bare", "p99_vs_bare", "overflows_vs_bare")
    }
    assert set(results["goals"]) == {
        "accept_vs_bare", "sold_out_vs_bare", "drain_vs_raw_insert", "time_to_issue_p99_s",
        *burst_goals, *FEED_GOALS,
    }  # fmt: skip
    # The burst ran every target on both routes, one and two processes, and every drop's
    # invariants held: as many rows as answers said accepted, none twice, all drained.
    burst = results["burst"]
    assert set(burst["table"]) == {
        f"{target}-x{n}" for target in ("bare-bare", "gateway-native", "gateway-seed")
        for n in (1, 2)
    }  # fmt: skip
    assert burst["invariants_ok"], burst["drops"]
    assert all(drop["rows"] == drop["total_quantity"] for drop in burst["drops"]), burst["drops"]
    assert "burst: 200 connections at once" in done.stdout
    _assert_feed_measured(results["feed"])
    assert "live feed: 50 subscribers on one gateway process" in done.stdout
    _assert_all_stopped(results["processes"])
    assert not Path(results["stack_folder"]).exists()


def test_loadtest_tiny_run_writes_a_clean_report(tmp_path: Path) -> None:
    """The default run: the same drop with clicking users, then with feed users (who arrive
    early, wait for the opening and stop at the sold-out), each checked, and the comparison."""
    report = tmp_path / "report"
    done = _run(
        [
            str(REPO / "scripts" / "loadtest"),
            "--users", "4", "--spawn-rate", "4", "--duration", "4s", "--stock", "50",
            "--user-ids", "300", "--workers", "1", "--arrive-early", "3",
            "--report-dir", str(report),
        ],
        300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "issued 50/50" in done.stderr  # progress lines while it ran
    assert "the feed removed" in done.stdout
    summary = (report / "summary.md").read_text()
    assert (
        "**clicking users: 50 issued of 50, 0 duplicates, 0 lost"
        " · feed users: 50 issued of 50, 0 duplicates, 0 lost**"
    ) in summary
    assert "## What the live feed removed" in summary
    assert "| sent after the sold-out |" in summary
    run = json.loads((report / "run.json").read_text())
    assert run["ok"]
    # Each drop has its own files, counts and invariants: the clicking one at the top, the
    # feed one under feed/.
    for folder, drop in ((report, run), (report / "feed", run["feed_drop"])):
        assert (folder / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (folder / "locust.html").stat().st_size > 0
        assert (folder / "locust_stats.csv").read_text().startswith("Type,Name,")
        assert drop["ok"], drop["problems"]
        assert drop["counts_match"], drop["outcomes"]
        assert drop["outcomes"]["accepted"] == {"locust": 50, "gateway": 50}
        assert drop["accepted_told"] == 50
        assert drop["time_to_issue"]["rows"] == 50
        assert drop["time_to_issue"]["metric"]["rows"] == 50
        # The load test's own subscription heard the window open and the coupon sell out.
        assert drop["facts"]["heard"]["started"] == 1
        assert drop["facts"]["sold_out_at"] > drop["facts"]["opens_at"]
    assert summary.count("time to issue (the 202 to the row in MySQL), 50 rows") == 2
    clicking = run["facts"]["user_classes"]
    assert set(clicking) == {"CouponDropUser"}
    assert clicking["CouponDropUser"]["before_open"] > 0  # they hammered the closed window
    feeding = run["feed_drop"]["facts"]
    assert set(feeding["user_classes"]) == {"FeedDropUser"}
    feed_users = feeding["user_classes"]["FeedDropUser"]
    assert feed_users["users"] == 4
    # Every feed user subscribed once and waited for the opening; none clicked a closed window.
    assert run["feed_drop"]["locust_rows"]["feed subscribed"]["requests"] == 4
    assert feeding["feed"]["event snapshot"] == 4
    assert feed_users["before_open"] == 0
    assert "outside_window" not in run["feed_drop"]["outcomes"]
    # The comparison: what the feed users sent after the sold-out, per user, against the
    # clicking users (no threshold: only that the feed users stopped, and the report says so).
    effect = run["feed_effect"]
    assert effect["clicking"]["users"] == effect["feed"]["users"] == 4
    assert effect["clicking"]["issue_requests"] == sum(
        pair["locust"] for pair in run["outcomes"].values()
    )
    assert effect["feed"]["issue_requests"] == sum(
        pair["locust"] for pair in run["feed_drop"]["outcomes"].values()
    )
    assert effect["feed"]["after_sold_out"] < effect["clicking"]["after_sold_out"]
    assert 0 < effect["removed"]["after_sold_out"] <= 1
    assert 0 < effect["removed"]["issue_requests"] <= 1
    _assert_all_stopped(run["processes"])
    assert not Path(run["stack_folder"]).exists()
