"""Every line a process writes in JSON mode is JSON: ours (structlog), and those of the libraries
that log through the standard library (aiohttp, aiomysql, asyncio), with the same fields."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import orjson

from tests.helpers import REPO

PROGRAM = textwrap.dedent(
    """
    import logging
    import structlog
    from shared import logging as shared_logging

    shared_logging.configure({format!r}, "info")
    logging.getLogger("aiohttp.server").warning("handler failed for %s", "/x")
    logging.getLogger("aiomysql").info("below WARNING: not written")
    try:
        raise ConnectionError("gone")
    except ConnectionError:
        logging.getLogger("asyncio").exception("task died")
    structlog.get_logger("gateway").info("ours", port=8080)
    """
)


def _run(log_format: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM.format(format=log_format)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stderr.splitlines()


def test_library_lines_are_json_in_json_mode() -> None:
    lines = [orjson.loads(line) for line in _run("json")]  # fails on any plain-text line
    library = [line for line in lines if "logger" in line]
    assert [(line["logger"], line["level"]) for line in library] == [
        ("aiohttp.server", "warning"),
        ("asyncio", "error"),
    ]
    assert library[0]["event"] == "handler failed for /x"
    assert library[1]["exception"][0]["exc_type"] == "ConnectionError"
    for line in lines:
        assert {"event", "level", "timestamp", "pid"} <= set(line), line
    assert any(line.get("event") == "ours" and line.get("port") == 8080 for line in lines)


def test_library_lines_stay_plain_on_a_console() -> None:
    lines = _run("console")
    assert "aiohttp.server handler failed for /x" in lines
