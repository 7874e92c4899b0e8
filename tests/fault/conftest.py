"""Fixtures of the fault tests: stacks of real processes that are always stopped, and the
one-line measurements every fault test reports (printed, and repeated in the summary)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from tests.fault.harness import Stack, make_stack

MEASUREMENTS: list[str] = []
FAILED = pytest.StashKey[bool]()

StackFactory = Callable[..., Awaitable[Stack]]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, Any]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[FAILED] = True
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MEASUREMENTS:
        terminalreporter.section("fault measurements")
        for line in MEASUREMENTS:
            terminalreporter.write_line(line)


@pytest.fixture
def measure() -> Callable[[str], str]:
    """Print a measurement line (``pytest -s`` shows it) and keep it for the summary."""

    def record(line: str) -> str:
        print(line)
        MEASUREMENTS.append(line)
        return line

    return record


@pytest.fixture
async def stacks(
    request: pytest.FixtureRequest, mysql_service_user: str
) -> AsyncIterator[StackFactory]:
    """``await stacks(private_mysql=False, appendfsync="always", **settings)`` starts a stack.

    Every stack gets its own short temp dir (unix socket paths must stay short), a private
    Redis, and either a private MariaDB (for tests that stop or kill it) or a fresh database on
    the session's server. Everything is stopped at teardown, also when the test failed; on a
    failure the last lines of every process's log are printed.
    """
    started: list[Stack] = []
    workdirs: list[Path] = []

    async def make(*, private_mysql: bool = False, **options: Any) -> Stack:
        workdir = Path(tempfile.mkdtemp(prefix="fault-"))
        workdirs.append(workdir)
        stack = await make_stack(
            workdir, session_mysql_url=None if private_mysql else mysql_service_user, **options
        )
        started.append(stack)
        return stack

    yield make
    problems = []
    for stack in started:
        if request.node.stash.get(FAILED, False):
            print(f"\n=== process logs of {request.node.name}\n{stack.log_tails()}")
        problems += await stack.close()
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)
    assert not problems, f"teardown problems: {problems}"
