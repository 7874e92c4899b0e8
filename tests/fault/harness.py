"""The fault harness: real processes on free ports, each with its own directory, and the
signals that break them.

- :class:`RedisServer`, :class:`MariaDBServer`: the servers of :mod:`tests.servers` (started
  the same way as everywhere else), driven from the event loop: killed, paused, restarted on
  the same data (or, for Redis, empty);
- :class:`ServiceProcess`: ``python -m gateway`` / ``python -m stream_worker`` (or the crash
  driver) configured only through ``Settings.to_env()``;
- :class:`Stack`: one system under test (servers, gateways, workers, clients for checking).

Every process runs under a mirakuru executor in its own process group, so a signal reaches the
whole group and the harness can always stop what it started. Blocking executor calls run in a
thread, so a load running on the event loop keeps going while a process restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import aiomysql
import orjson
import psutil
import pymysql
from mirakuru import HTTPExecutor, SimpleExecutor
from mirakuru.exceptions import ExecutorError
from redis.exceptions import RedisError

from shared import keys
from shared.coupon_requests import NewCoupon
from shared.model import Coupon
from shared.mysql.migrations import migrate
from shared.mysql.pool import create_pool
from shared.ops import coupons
from shared.redis import client as redis_client
from shared.settings import Settings
from tests import servers
from tests.fault.link import HeldLink
from tests.helpers import TEST_ACTOR
from tests.servers import HOST, REPO, free_port, log_tail

ADMIN_TOKEN = "fault-admin-token-0123456789"
START_TIMEOUT = 30.0
# Debian's faketime package; the multiarch directory depends on the machine.
FAKETIME_LIBRARY = next(
    iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))),
    Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
)


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    *,
    within: float,
    interval: float = 0.02,
    what: str = "condition",
) -> float:
    """Poll ``condition`` until true; returns the monotonic time it became true.

    Unlike tests.helpers.wait_for, a condition that raises a connection error counts as "not
    yet": during a fault the stores it reads may be down.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            if await condition():
                return time.monotonic()
        except (RedisError, OSError, pymysql.err.MySQLError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {within} s")
        await asyncio.sleep(interval)


def faketime_env(offset_seconds: int | None) -> dict[str, str]:
    """Environment that runs a process under libfaketime, its wall clock off by the offset;
    the monotonic clock stays true, so timeouts and intervals keep their meaning."""
    if offset_seconds is None:
        return {}
    assert FAKETIME_LIBRARY.exists(), "libfaketime is missing: apt-get install -y faketime"
    return {
        "LD_PRELOAD": str(FAKETIME_LIBRARY),
        "FAKETIME": f"{offset_seconds:+d}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


class ServiceProcess:
    """One child process under a mirakuru executor: start, signals, restart, log."""

    def __init__(
        self, name: str, executor: SimpleExecutor, log_path: Path, log: IO[str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._executor = executor
        self._log = log
        self.paused = False

    @property
    def pid(self) -> int:
        process = self._executor.process
        assert process is not None, f"{self.name} is not running"
        return int(process.pid)

    @property
    def running(self) -> bool:
        return bool(self._executor.running())

    @property
    def returncode(self) -> int | None:
        process = self._executor.process
        return None if process is None else process.poll()

    async def start(self) -> None:
        """Start and wait for readiness (the executor's check) off the event loop."""
        await asyncio.to_thread(self._executor.start)

    def send(self, signum: int) -> None:
        os.killpg(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL the process group and reap it; restartable afterwards."""
        if self.paused:
            self.resume()
        self._executor.kill(sig=signal.SIGKILL)

    def pause(self) -> None:
        self.send(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.send(signal.SIGCONT)
        self.paused = False

    def is_stopped(self) -> bool:
        """The process is stopped by a signal (SIGSTOP), as the kernel reports it."""
        try:
            return bool(psutil.Process(self.pid).status() == psutil.STATUS_STOPPED)
        except psutil.NoSuchProcess:
            return False

    async def terminate(self) -> None:
        """SIGTERM and wait (the executor escalates to SIGKILL after its timeout)."""
        if self._executor.process is None:
            return
        # A frozen process (frozen by us, or by itself) would not act on SIGTERM.
        with contextlib.suppress(ProcessLookupError):
            self.resume()
        try:
            await asyncio.to_thread(self._executor.stop)
        except ExecutorError:
            # An unexpected exit status at shutdown is not what these tests check.
            self._executor.kill(sig=signal.SIGKILL)

    async def wait_exit(self, *, within: float) -> int:
        """Wait for the process to end by itself; returns its exit status."""
        process = self._executor.process
        assert process is not None, f"{self.name} is not running"
        try:
            code = await asyncio.to_thread(process.wait, within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still runs after {within} s") from None
        self._executor.kill(sig=signal.SIGKILL)  # reaps and clears: restartable
        return int(code)

    async def close(self) -> None:
        """Stop for good and close the log."""
        try:
            await self.terminate()
        finally:
            if self._log is not None:
                self._log.close()

    def events(self, event: str) -> list[dict[str, Any]]:
        """The process's JSON log lines whose event is ``event``."""
        found = []
        with contextlib.suppress(OSError), self.log_path.open(errors="replace") as log:
            for line in log:
                if event in line and line.startswith("{"):
                    with contextlib.suppress(orjson.JSONDecodeError):
                        record = orjson.loads(line)
                        if record.get("event") == event:
                            found.append(record)
        return found

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)


def _log_file(path: Path) -> IO[str]:
    return path.open("a", buffering=1)


class RedisServer(ServiceProcess):
    """The private redis-server of :mod:`tests.servers`, restartable on the same data."""

    def __init__(
        self,
        workdir: Path,
        *,
        appendfsync: str = "always",
        replica_of: int | None = None,
        cluster: bool = False,
    ) -> None:
        self.server = servers.RedisServer(
            workdir, appendfsync=appendfsync, replica_of=replica_of, cluster=cluster
        )
        super().__init__(self.server.name, self.server.executor, self.server.log_path,
                         self.server.log)  # fmt: skip

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> None:
        """Start; ready once Redis has replayed its AOF."""
        await asyncio.to_thread(self.server.start)

    async def restart(self, *, empty: bool = False) -> None:
        """Kill (if running) and start again, on the same data or, with ``empty``, on none."""
        if self.running:
            self.kill()
        if empty:
            self.server.wipe()
        await self.start()


class SentinelProcess(ServiceProcess):
    """A ``redis-server --sentinel`` of :mod:`tests.servers` watching the stack's primary."""

    def __init__(self, workdir: Path, *, primary_port: int) -> None:
        self.server = servers.SentinelServer(workdir, primary_port=primary_port)
        super().__init__(self.server.name, self.server.executor, self.server.log_path,
                         self.server.log)  # fmt: skip

    async def start(self) -> None:
        await asyncio.to_thread(self.server.start)


class MariaDBServer(ServiceProcess):
    """The private mariadbd of :mod:`tests.servers`, with the service account the tests use."""

    def __init__(self, workdir: Path) -> None:
        self.server = servers.MariaDBServer(workdir)
        super().__init__(self.server.name, self.server.executor, self.server.log_path,
                         self.server.log)  # fmt: skip

    def url(self, database: str) -> str:
        return self.server.url(database)

    async def start(self) -> None:
        """Start (installing it and making the account the first time); ready for logins."""
        first = not self.server.installed
        await asyncio.to_thread(self.server.start)
        if first:
            await asyncio.to_thread(self.server.create_service_user)


def fault_settings(redis_url: str, mysql_url: str, **changes: Any) -> Settings:
    """Settings for a system under fault: short reclaim and back-off times so that recovery
    is quick, but long enough that a busy worker is not mistaken for a dead one."""
    base = Settings(
        redis_url=redis_url,
        mysql_url=mysql_url,
        admin_token=ADMIN_TOKEN,
        log_format="json",
        log_level="info",
        worker_name="fault-worker",
        # Generous: on this shared 2-core box an AOF fsync stall (appendfsync always) can pass
        # 0.5 s, and the resulting "unknown" 503 is noise in tests of other faults (F1 saw
        # ok=99, unknown=1 once). F11, which tests the timeout itself, sets its own.
        redis_timeout_seconds=2.0,
        snapshot_ttl_seconds=2.0,
        reclaim_idle_ms=1000,
        max_deliveries=3,
        block_ms=200,
        batch_size=200,
        discovery_interval_seconds=0.2,
        mysql_retry_max_seconds=0.5,
        shutdown_grace_seconds=2.0,
    )
    return base.replace(**changes) if changes else base


class Stack:
    """One system under test: Redis, MySQL (a private server or a database of the session's),
    the gateway and worker processes started on it, and clients for checking."""

    def __init__(
        self,
        workdir: Path,
        settings: Settings,
        redis_server: RedisServer,
        mysql_server: MariaDBServer | None,
    ) -> None:
        self.workdir = workdir
        self.settings = settings
        self.redis_server = redis_server
        self.mysql_server = mysql_server
        self.replicas: list[RedisServer] = []
        self.links: list[HeldLink] = []
        """The replicas' replication links, in the order of :attr:`replicas`."""
        self.sentinels: list[SentinelProcess] = []
        self.cluster_nodes: list[RedisServer] = []
        """On a Redis Cluster: every node (:attr:`redis_server` is the first of them)."""
        self.redis = redis_client.for_settings(settings, socket_timeout=5.0)
        """Follows the primary through the sentinels when the stack has them."""
        self.services: list[ServiceProcess] = []
        self._names: set[str] = set()
        self.on_session_server = mysql_server is None
        """The database lives on the session's server and is dropped at close."""

    # --- processes -------------------------------------------------------------------------

    def _env(self, settings: Settings, extra: dict[str, str] | None) -> dict[str, str]:
        env = settings.to_env()
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def _unique(self, name: str) -> str:
        # A restarted process keeps its object; a second process of one name is a test bug.
        assert name not in self._names, f"two processes named {name}"
        self._names.add(name)
        return name

    async def start_gateway(
        self,
        name: str = "gateway",
        *,
        clock_offset_seconds: int | None = None,
        **changes: Any,
    ) -> Gateway:
        """A gateway process on a free port, ready (``/readyz`` 200) when this returns.

        ``clock_offset_seconds`` runs it under libfaketime: its wall clock is off by that much
        (the monotonic clock is left alone, so timeouts still mean what they say).
        """
        port = free_port()
        settings = self.settings.replace(**{"http_port": port, "log_level": "warning", **changes})
        extra = faketime_env(clock_offset_seconds)
        log_path = self.workdir / f"{self._unique(name)}.log"
        log = _log_file(log_path)
        executor = HTTPExecutor(
            [sys.executable, "-m", "gateway"],
            url=f"http://{HOST}:{port}/readyz",
            status=200,
            method="GET",
            request_timeout=2.0,
            cwd=str(REPO),
            envvars=self._env(settings, extra),
            timeout=START_TIMEOUT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        gateway = Gateway(name, executor, log_path, log, url=f"http://{HOST}:{port}")
        self.services.append(gateway)
        await gateway.start()
        return gateway

    async def start_worker(
        self,
        slot: int,
        *,
        crash_at: str | None = None,
        clock_offset_seconds: int | None = None,
        **changes: Any,
    ) -> WorkerProcess:
        """Worker ``slot`` with the stable consumer name ``fault-worker-<slot>``.

        With ``crash_at`` it is the crash driver (tests/fault/crashing_worker.py), started
        without waiting for readiness since it may die at once; otherwise it is
        ``python -m stream_worker``, ready when its metrics port answers.
        """
        metrics_port = free_port()
        settings = self.settings.replace(
            worker_name=f"fault-worker-{slot}", worker_metrics_port=metrics_port, **changes
        )
        extra = faketime_env(clock_offset_seconds)
        if crash_at is not None:
            extra["FAULT_CRASH_AT"] = crash_at
        module = "tests.fault.crashing_worker" if crash_at else "stream_worker"
        name = self._unique(f"worker-{slot}-{crash_at}" if crash_at else f"worker-{slot}")
        log_path = self.workdir / f"{name}.log"
        log = _log_file(log_path)
        common: dict[str, Any] = {
            "cwd": str(REPO),
            "envvars": self._env(settings, extra),
            "timeout": START_TIMEOUT,
            "stdout": log,
            "stderr": subprocess.STDOUT,
        }
        command = [sys.executable, "-m", module]
        executor: SimpleExecutor
        if crash_at is None:
            executor = HTTPExecutor(
                command,
                url=f"http://{HOST}:{metrics_port}/metrics",
                status=200,
                method="GET",
                request_timeout=2.0,
                **common,
            )
        else:
            executor = SimpleExecutor(command, **common)
        worker = WorkerProcess(
            name,
            executor,
            log_path,
            log,
            consumer=settings.worker_name,
            url=f"http://{HOST}:{metrics_port}",
        )
        self.services.append(worker)
        await worker.start()
        return worker

    async def close(self) -> list[str]:
        """Stop every process this stack started, then its servers; returns the problems."""
        problems = []
        nodes = self.cluster_nodes or [self.redis_server]
        stores = [*self.sentinels, *self.replicas, *nodes, self.mysql_server]
        for service in [*reversed(self.services), *stores]:
            if service is None:
                continue
            try:
                await service.close()
            except Exception as exc:  # keep stopping the others
                problems.append(f"{service.name}: {exc!r}")
        for link in self.links:
            await link.close()
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        if self.on_session_server:
            try:
                await self._drop_database()
            except Exception as exc:
                problems.append(f"drop database: {exc!r}")
        return problems

    async def _drop_database(self) -> None:
        dsn = self.settings.mysql
        conn = await aiomysql.connect(
            host=dsn.host, port=dsn.port, user=dsn.user, password=dsn.password, autocommit=True
        )
        try:
            async with conn.cursor() as cur:
                await cur.execute(f"DROP DATABASE IF EXISTS `{dsn.database}`")
        finally:
            conn.close()

    def count_log_events(self, event: str) -> int:
        """How many log lines of this stack's processes name ``event`` (JSON logs)."""
        return sum(len(service.events(event)) for service in self.services)

    def log_tails(self, lines: int = 25) -> str:
        parts = []
        stores = [self.redis_server, *self.replicas, *self.sentinels, self.mysql_server]
        for service in [*stores, *self.services]:
            if service is not None:
                parts.append(f"--- {service.name} ({service.log_path})\n{service.log_tail(lines)}")
        return "\n".join(parts)

    # --- the stores --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def mysql(self) -> AsyncIterator[aiomysql.Pool]:
        """A fresh pool: connections of an earlier pool may have died with a killed server."""
        pool = await create_pool(self.settings.mysql, maxsize=2)
        try:
            yield pool
        finally:
            pool.close()
            await pool.wait_closed()

    async def sql(self, query: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        async with self.mysql() as pool, pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(query, tuple(args))
            rows = list(await cur.fetchall())
            await conn.commit()
        return rows

    async def create_coupon(
        self,
        total: int | None,
        *,
        start: datetime,
        end: datetime,
        title: str = "fault drop",
    ) -> Coupon:
        """The same code path as ``POST /admin/coupons``: MySQL row, then Redis state."""
        new = NewCoupon(
            title=title,
            total_quantity=total,
            discount_amount=1000,
            min_available_amount=10000,
            date_issue_start=start,
            date_issue_end=end,
        )
        async with self.mysql() as pool:
            return await coupons.create_coupon(pool, self.redis, new, actor=TEST_ACTOR)

    async def redis_now_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def backlog(self, coupon_id: int) -> int:
        """Entries of the coupon's stream not yet acknowledged: pending plus not yet read."""
        k = keys.CouponKeys(coupon_id)
        groups = await self.redis.xinfo_groups(k.requests)
        group = next(g for g in groups if g["name"] == keys.GROUP)
        lag = group.get("lag")
        if lag is None:
            # Redis cannot tell the lag (entries were deleted): compare the ids instead.
            stream = await self.redis.xinfo_stream(k.requests)
            lag = 0 if group["last-delivered-id"] == stream["last-generated-id"] else 1
        return int(group["pending"]) + int(lag)

    async def pending_of(self, coupon_ids: Iterable[int], consumer: str) -> int:
        """Entries delivered to ``consumer`` and not yet acknowledged."""
        total = 0
        for coupon_id in coupon_ids:
            rows = await self.redis.xpending_range(
                keys.CouponKeys(coupon_id).requests, keys.GROUP, min="-", max="+",
                count=100_000, consumername=consumer,
            )  # fmt: skip
            total += len(rows)
        return total

    async def wait_drained(self, coupon_ids: Iterable[int], *, within: float = 60.0) -> float:
        """Wait until every listed stream is fully acknowledged; returns when (monotonic)."""
        ids = list(coupon_ids)

        async def drained() -> bool:
            for coupon_id in ids:
                if await self.backlog(coupon_id):
                    return False
            return True

        return await wait_until(drained, within=within, interval=0.05, what="drained")


class Gateway(ServiceProcess):
    """A gateway process and the base URL it serves on."""

    def __init__(
        self, name: str, executor: SimpleExecutor, log_path: Path, log: IO[str], *, url: str
    ) -> None:
        super().__init__(name, executor, log_path, log)
        self.url = url


class WorkerProcess(ServiceProcess):
    """A worker process, its consumer name in the ``issuers`` group, and the base URL of its
    metrics and probes."""

    def __init__(
        self,
        name: str,
        executor: SimpleExecutor,
        log_path: Path,
        log: IO[str],
        *,
        consumer: str,
        url: str,
    ) -> None:
        super().__init__(name, executor, log_path, log)
        self.consumer = consumer
        self.url = url


async def make_stack(
    workdir: Path,
    *,
    session_mysql_url: str | None,
    appendfsync: str = "always",
    replicas: int = 0,
    cluster: bool = False,
    **changes: Any,
) -> Stack:
    """Start Redis (and, without ``session_mysql_url``, a private MariaDB); migrate a fresh
    database. The caller owns the stack and must ``close()`` it.

    With ``replicas``, the primary gets that many replicas and three sentinels watch them, and
    every process of the stack (the stack's own client too) finds the primary through them.
    Each replica replicates through a :class:`~tests.fault.link.HeldLink` of
    :attr:`Stack.links`, which a test can hold to put it behind.

    With ``cluster``, Redis is a Redis Cluster of three masters with a replica each
    (:attr:`Stack.cluster_nodes`), and every process uses it as one.
    """
    nodes = [
        RedisServer(workdir / f"node-{n}", appendfsync=appendfsync, cluster=True)
        for n in range(CLUSTER_NODES if cluster else 0)
    ]
    redis_server = nodes[0] if nodes else RedisServer(workdir, appendfsync=appendfsync)
    if cluster:
        changes = {"redis_cluster": True, **changes}
    if replicas:
        sentinels = [
            SentinelProcess(workdir / f"sentinel-{n}", primary_port=redis_server.server.port)
            for n in range(3)
        ]
        changes = {
            "redis_sentinels": ",".join(sentinel.server.address for sentinel in sentinels),
            "redis_sentinel_master": servers.SENTINEL_MASTER,
            **changes,
        }
    mysql_server = None if session_mysql_url else MariaDBServer(workdir)
    database = f"coupon_fault_{uuid.uuid4().hex[:10]}"
    if mysql_server is None:
        assert session_mysql_url is not None
        mysql_url = f"{session_mysql_url}/{database}"
    else:
        mysql_url = mysql_server.url(database)
    stack = Stack(workdir, fault_settings(redis_server.url, mysql_url, **changes), redis_server,
                  mysql_server)  # fmt: skip
    stack.cluster_nodes = nodes
    try:
        if cluster:
            await _start_cluster(nodes)
        else:
            await redis_server.start()
        if replicas:
            await _start_replication(stack, replicas, sentinels)
        if mysql_server is not None:
            await mysql_server.start()
        await migrate(stack.settings.mysql)
    except BaseException:
        await stack.close()
        raise
    return stack


CLUSTER_NODES = 6
"""Three masters, a replica each."""


async def _start_cluster(nodes: list[RedisServer]) -> None:
    for node in nodes:
        await node.start()
    await asyncio.to_thread(
        subprocess.run,
        [servers.find_binary("redis-cli"), "--cluster", "create",
         *(f"{HOST}:{node.server.port}" for node in nodes),
         "--cluster-replicas", "1", "--cluster-yes"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip

    async def every_node_sees_it_up() -> bool:
        for node in nodes:
            client = redis_client.connect(node.url, socket_timeout=2)
            try:
                info = await client.execute_command("CLUSTER INFO")
                if info.get("cluster_state") != "ok":
                    return False
                replication = await client.info("replication")
                if replication.get("role") == "slave" and (
                    replication.get("master_link_status") != "up"
                ):
                    return False
            finally:
                await client.aclose()
        return True

    await wait_until(every_node_sees_it_up, within=START_TIMEOUT, what="cluster up")


async def _start_replication(stack: Stack, replicas: int, sentinels: list[SentinelProcess]) -> None:
    """Replicas of the stack's primary, in sync, and three sentinels that see the primary,
    every replica and one another (a failover needs a majority of them to agree)."""
    primary_port = stack.redis_server.server.port
    for n in range(replicas):
        link = HeldLink(primary_port)
        await link.start()
        stack.links.append(link)
        replica = RedisServer(stack.workdir / f"replica-{n}", replica_of=link.port)
        stack.replicas.append(replica)
        await replica.start()
    for replica in stack.replicas:
        await wait_until(
            lambda r=replica: replica_in_sync(r), within=START_TIMEOUT, what="replica in sync"
        )
    for sentinel in sentinels:
        stack.sentinels.append(sentinel)
        await sentinel.start()

    async def sentinels_ready() -> bool:
        for sentinel in stack.sentinels:
            client = redis_client.connect(f"redis://{sentinel.server.address}/0", socket_timeout=2)
            try:
                (state,) = [
                    m for m in await client.execute_command("SENTINEL", "MASTERS")
                    if m["name"] == servers.SENTINEL_MASTER
                ]  # fmt: skip
                if int(state["num-slaves"]) < replicas or int(state["num-other-sentinels"]) < 2:
                    return False
            finally:
                await client.aclose()
        return True

    await wait_until(sentinels_ready, within=START_TIMEOUT, what="sentinels see the topology")


async def replica_in_sync(replica: RedisServer) -> bool:
    """The replica's link to its primary is up and it has finished the initial sync."""
    client = redis_client.connect(replica.url, socket_timeout=2)
    try:
        info = await client.info("replication")
        return info.get("role") == "slave" and info.get("master_link_status") == "up"
    finally:
        await client.aclose()


async def sentinel_primary(stack: Stack) -> int | None:
    """The port of the primary the first answering sentinel names (None if none answers)."""
    for sentinel in stack.sentinels:
        if sentinel.paused or not sentinel.running:
            continue
        client = redis_client.connect(f"redis://{sentinel.server.address}/0", socket_timeout=1)
        try:
            address = await client.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", servers.SENTINEL_MASTER
            )
            return int(address[1])
        except (RedisError, OSError):
            continue
        finally:
            await client.aclose()
    return None


async def replica_promoted(stack: Stack) -> bool:
    """The sentinels name one of the stack's replicas as the primary."""
    return await sentinel_primary(stack) in {replica.server.port for replica in stack.replicas}
