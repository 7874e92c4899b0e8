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
        *burst_goals,
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
    _assert_all_stopped(results["processes"])
    assert not Path(results["stack_folder"]).exists()


def test_loadtest_tiny_run_writes_a_clean_report(tmp_path: Path) -> None:
    report = tmp_path / "report"
    done = _run(
        [
            str(REPO / "scripts" / "loadtest"),
            "--users", "4", "--spawn-rate", "4", "--duration", "4s", "--stock", "50",
            "--user-ids", "300", "--workers", "1", "--report-dir", str(report),
        ],
        300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "issued 50/50" in done.stderr  # progress lines while it ran
    summary = (report / "summary.md").read_text()
    assert "**50 issued of 50, 0 duplicates, 0 lost**" in summary
    assert (report / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report / "locust.html").stat().st_size > 0
    assert (report / "locust_stats.csv").read_text().startswith("Type,Name,")
    run = json.loads((report / "run.json").read_text())
    assert run["ok"]
    assert run["counts_match"]
    assert run["outcomes"]["accepted"] == {"locust": 50, "gateway": 50}
    assert run["accepted_told"] == 50
    assert run["time_to_issue"]["rows"] == 50
    assert run["time_to_issue"]["metric"]["rows"] == 50
    assert "time to issue (the 202 to the row in MySQL), 50 rows" in summary
    _assert_all_stopped(run["processes"])
    assert not Path(run["stack_folder"]).exists()
