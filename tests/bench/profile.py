"""``./scripts/bench --profile``: where one gateway process spends its CPU on the hot paths.

For the bare aiohttp endpoint (the yardstick) and each path of the gateway (sold out,
duplicate, accept) it drives one process with ``wrk`` while
``py-spy`` samples that process, and writes a flame graph (SVG, opens in any browser) plus the
top functions by own time. The gateway runs with the defaults an operator gets; only the
pipeline-lag shedding is off, because no worker runs here and the backlog only grows.

    ./scripts/bench --profile                         flame graphs into docs/flamegraphs/
    ./scripts/bench --profile --profile-tag before    file names end in -before.svg
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import aiohttp

from tests.bench import checks
from tests.bench.burst import start_bare
from tests.bench.stack import Stack
from tests.bench.wrk import WRK_SCRIPT
from tests.servers import REPO, find_binary

DEFAULT_FOLDER = REPO / "docs" / "flamegraphs"

# (name, coupon stock, wrk body template, user id range): the user ids pick the path.
PATHS = (
    ("sold_out", 1, (1, 1_000_000_000)),
    ("duplicate", None, (1, 1)),
    ("accept", None, (1, 1_000_000_000)),
)


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


async def profile(
    running: Stack, folder: Path, tag: str, seconds: int, connections: int
) -> dict[str, str]:
    """Record one flame graph per path; returns path name -> SVG file."""
    folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before any load
    gateway = running.start_gateway(name="profiled", shed_max_lag=0, shed_max_age_seconds=0.0)
    bare = start_bare(running, 1)
    written: dict[str, str] = {}
    async with aiohttp.ClientSession() as session:
        for name, total, (uid_min, uid_max) in (("bare", None, (1, 10**9)), *PATHS):
            service, path = bare, "/issue"
            if name != "bare":
                service = gateway
                coupon = await checks.create_coupon(
                    session, gateway.url, running.admin_token, total=total, title=name
                )
                path = f"/v1/coupons/{coupon}/issues"
                # Sold out: sell the one coupon and ask again, so the gateway knows.
                # Duplicate: user 1 holds it, and every request below is user 1's.
                for user in (1, 2):
                    async with session.post(
                        f"{gateway.url}{path}", json={"user_id": user}
                    ) as response:
                        await response.read()
            pid = service.procs[0].pid
            svg = folder / f"{name}{'-' + tag if tag else ''}.svg"
            wrk = await asyncio.create_subprocess_exec(
                find_binary("wrk"), "-t1", f"-c{connections}", f"-d{seconds + 2}s",
                "-s", str(WRK_SCRIPT), service.url,
                env={
                    "BENCH_PATH": path,
                    "BENCH_BODY": '{"user_id":%d}',
                    "BENCH_UID_MIN": str(uid_min),
                    "BENCH_UID_MAX": str(uid_max),
                },
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            await asyncio.sleep(1)  # warm: the snapshot is cached, the loop is busy
            # Two samplers at once: the SVG to look at, the collapsed stacks to summarise.
            stacks = svg.with_suffix(".txt")
            spies = []
            for fmt, output in (("flamegraph", svg), ("raw", stacks)):
                spy = await asyncio.create_subprocess_exec(
                    _py_spy(), "record", "--pid", str(pid), "--duration", str(seconds),
                    "--rate", "200", "--nonblocking", "--format", fmt, "--output", str(output),
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                spies.append(spy)
            for spy in spies:
                _, err = await spy.communicate()
                if spy.returncode != 0:
                    raise RuntimeError(f"py-spy failed: {err.decode()[-500:]}")
            top = svg.with_suffix(".top.txt")
            await asyncio.to_thread(_summarise_file, stacks, top)
            out, _ = await wrk.communicate()
            lines = out.decode().splitlines()
            rate = next((line for line in lines if "Requests/sec" in line), "")
            print(f"==> {name}: {rate.strip()}; flame graph {svg}", file=sys.stderr)
            written[name] = str(svg)
    running.stop([*gateway.procs, *bare.procs])
    return written


def _summarise_file(stacks: Path, top: Path) -> None:
    top.write_text(summarise(stacks.read_text()))
    stacks.unlink()


def summarise(collapsed: str, top: int = 40) -> str:
    """Share of samples per function, inclusive and own, from py-spy's collapsed stacks
    (``frame;frame;frame count`` per line). Idle samples (the loop waiting in ``select``/
    ``epoll``) count in the total, so the shares are of wall time on the process's thread."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    lines = [f"{total} samples", "", "inclusive %  own %  function"]
    for frame, count in sorted(inclusive.items(), key=lambda item: -item[1])[:top]:
        share, own_share = 100 * count / total, 100 * own.get(frame, 0) / total
        lines.append(f"{share:10.1f}  {own_share:5.1f}  {frame}")
    lines += ["", "own %  function (top by own time)"]
    for frame, count in sorted(own.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"{100 * count / total:5.1f}  {frame}")
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    """``handler (gateway/routes.py:25)`` -> ``handler (gateway/routes.py)``: one entry per
    function rather than per line; site-packages paths shortened to the package."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif str(REPO) in path:
        path = path.split(str(REPO) + "/", 1)[1]
    return f"{name} ({path})"
