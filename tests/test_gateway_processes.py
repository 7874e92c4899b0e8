"""``COUPON_GATEWAY_PROCESSES=N`` under supervisord with the shipped configuration
(deploy/supervisord/gateway.conf, as the image runs it): N processes on one port. A process that
dies is replaced, and its replacement drops the dead one's live gauges; SIGTERM lets every
process finish the requests in hand and exit, and no 202 given before or during the shutdown is
lost."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import orjson

from shared import keys
from shared.settings import Settings
from tests.helpers import REPO, child_env, drain, free_port, gateway_command, wait_for


def _pids(log: Path, event: str = "http_request") -> set[int]:
    """Pids of the processes that logged ``event`` (by default: an answered request)."""
    pids = set()
    for line in log.read_bytes().splitlines():
        if line.startswith(b"{"):
            record = orjson.loads(line)
            if record.get("event") == event:
                pids.add(int(record["pid"]))
    return pids


async def _supervised(
    settings: Settings, tmp_path: Path
) -> tuple[asyncio.subprocess.Process, str, Path, Path]:
    """Two gateway processes under supervisord, as the image runs them: the supervisor, the
    base URL, the log both processes write, and their shared metrics folder."""
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = child_env(
        settings.replace(http_port=port, gateway_processes=2, log_format="json", log_level="info"),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        supervisor = await asyncio.create_subprocess_exec(
            *gateway_command(2, tmp_path / "supervisord.pid"), cwd=REPO, env=env, stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    return supervisor, f"http://127.0.0.1:{port}", log, metrics_dir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_dead_process_is_replaced_and_sigterm_drains_everything(
    settings, redis, pool, make_coupon, check_invariants, tmp_path
):
    coupon = await make_coupon(total=100_000)
    supervisor, base, log, metrics_dir = await _supervised(settings, tmp_path)
    accepted: set[int] = set()
    try:
        connector = aiohttp.TCPConnector(force_close=True)  # new connections spread over both
        async with aiohttp.ClientSession(connector=connector) as session:

            async def ask(user: int) -> None:
                try:
                    async with session.post(
                        f"{base}/v1/coupons/{coupon.id}/issues", json={"user_id": user}
                    ) as response:
                        if response.status == 202:
                            accepted.add(user)
                except aiohttp.ClientError:
                    pass  # refused or reset while a process is down: the outcome is unknown

            users = iter(range(1, 1_000_000))

            async def both_processes_serve() -> bool:
                await asyncio.gather(*(ask(next(users)) for _ in range(4)))
                return len(_pids(log)) == 2

            await wait_for(both_processes_serve, within=30, interval=0.05)
            first = _pids(log)
            victim = min(first)
            os.kill(victim, signal.SIGKILL)

            async def replaced() -> bool:
                await asyncio.gather(*(ask(next(users)) for _ in range(4)))
                return len(_pids(log) - {victim}) == 2

            await wait_for(replaced, within=30, interval=0.05)
            # The replacement forgot the victim's live gauges (its counters stay in the totals).
            assert not list(metrics_dir.glob(f"gauge_live*_{victim}.db"))
            assert list(metrics_dir.glob(f"counter_{victim}.db"))
            # Shut down in the middle of a burst: requests in hand are answered.
            burst = [asyncio.create_task(ask(next(users))) for _ in range(300)]
            await asyncio.sleep(0)
            supervisor.send_signal(signal.SIGTERM)
            await asyncio.gather(*burst)
        code = await asyncio.wait_for(supervisor.wait(), 60)
    finally:
        if supervisor.returncode is None:
            supervisor.kill()
            await supervisor.wait()
        _kill_leftovers(log)
    assert code == 0
    assert not [pid for pid in _pids(log) if _alive(pid)], "a gateway process outlived SIGTERM"
    # Every 202 is in the stream, and becomes a row.
    queued = {int(f["u"]) for _, f in await redis.xrange(keys.CouponKeys(coupon.id).requests)}
    assert accepted <= queued
    await drain(redis, pool, settings)
    await check_invariants(coupon, accepted=accepted)


async def test_processes_stop_when_their_supervisor_is_killed(settings, tmp_path):
    """An orphan would keep serving on the shared port beside the next supervisor's processes:
    each gateway process asks the kernel for SIGTERM when its parent goes, and drains."""
    supervisor, _, log, _ = await _supervised(settings, tmp_path)
    started: set[int] = set()
    try:

        async def both_started() -> bool:
            started.update(_pids(log, "gateway_starting"))
            return len(started) == 2

        await wait_for(both_started, within=30, interval=0.05)
        supervisor.kill()
        await supervisor.wait()

        async def all_gone() -> bool:
            return not any(_alive(pid) for pid in started)

        await wait_for(all_gone, within=30, interval=0.1)
    finally:
        if supervisor.returncode is None:
            supervisor.kill()
            await supervisor.wait()
        _kill_leftovers(log)


def _kill_leftovers(log: Path) -> None:
    """Only after a failed test: never leave a gateway process behind."""
    for pid in _pids(log, "gateway_starting"):
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
