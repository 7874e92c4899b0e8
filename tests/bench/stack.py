"""A private, throw-away copy of the whole system for benchmarks and load tests.

Starts its own ``redis-server`` and ``mariadbd`` (:mod:`tests.servers`, as the tests do) on
free loopback ports with data in a temporary folder, applies the schema, and starts gateways,
workers or any helper process on request. Every process it starts is stopped by
:meth:`Stack.close` (SIGTERM, then SIGKILL after a grace period), which the ``with`` block calls
on any exit: success, failure or Ctrl-C. As a last resort each child gets ``PR_SET_PDEATHSIG``,
so even a SIGKILLed parent leaves nothing running.

With ``COUPON_REDIS_URL`` / ``COUPON_MYSQL_URL`` set, those servers are used instead (as
``scripts/run`` does) and nothing is started for them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import redis as redis_sync

from shared.settings import Settings
from tests.helpers import child_env, gateway_command
from tests.servers import (
    HOST,
    REPO,
    MariaDBServer,
    RedisServer,
    Server,
    die_with_parent,
    free_port,
    http_ok,
    log_tail,
    wait_for,
)

PYTHON = sys.executable


class StackError(RuntimeError):
    """A process did not come up; the message names its log."""


@dataclass
class Proc:
    """One child process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str]
    metrics_url: str | None = None
    """Where its Prometheus metrics are served, for the processes that serve them apart."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)


@dataclass
class Service:
    """Processes serving one HTTP port (a gateway of N processes, or a helper app)."""

    url: str
    port: int
    procs: list[Proc] = field(default_factory=list)


def raise_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt, so ``finally`` blocks stop everything."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


class Stack:
    """Redis, MariaDB and the service's processes under one temporary folder."""

    def __init__(self, *, keep: bool = False, redis_appendfsync: str = "always") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="coupon-stack-"))
        self.logs = self.root / "log"
        self.logs.mkdir()
        self._keep = keep
        self._appendfsync = redis_appendfsync
        self._procs: list[Proc] = []
        self._servers: list[Server] = []
        self._server_records: list[dict[str, object]] = []
        self.redis_url = os.environ.get("COUPON_REDIS_URL", "")
        self.mysql_url = os.environ.get("COUPON_MYSQL_URL", "")
        self.admin_token = secrets.token_urlsafe(24)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        try:
            if not self.redis_url:
                self._start_redis()
            if not self.mysql_url:
                self._start_mysql()
            self._migrate()
        except BaseException:
            self.close()
            raise
        return self

    def _migrate(self) -> None:
        """``couponctl db migrate``, as an operator runs it."""
        done = subprocess.run(
            [PYTHON, "-m", "shared.ops.cli", "db", "migrate"],
            cwd=REPO,
            env=self.env(self.settings()),
            capture_output=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise StackError(f"couponctl db migrate failed: {done.stderr.decode()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process this stack started, newest first, the servers last; remove the
        folder."""
        self.stop(list(reversed(self._procs)))
        for server in reversed(self._servers):
            server.close()
        if not self._keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def processes(self) -> list[dict[str, object]]:
        """Every process started so far (running or not), for the record."""
        return [
            *self._server_records,
            *({"pid": p.pid, "name": p.name, "argv": p.argv} for p in self._procs),
        ]

    # -- processes ---------------------------------------------------------------------------

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
    ) -> Proc:
        """Start a child with its output in ``log/<name>.log``."""
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as log_file:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C in the terminal reaches only us, and we stop the
                # children in order.
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, no Python state
            )
        proc = Proc(name, popen, log_path, list(argv))
        self._procs.append(proc)
        return proc

    def stop(self, procs: Sequence[Proc], grace: float = 15.0) -> None:
        """SIGTERM each process, wait up to ``grace`` seconds in all, SIGKILL what is left."""
        for proc in procs:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait(timeout=10)

    def wait_until(self, what: str, check: object, procs: Sequence[Proc], within: float) -> None:
        """Poll ``check()`` until true; fail early, with the log, if a process exits."""
        assert callable(check)
        deadline = time.monotonic() + within
        while True:
            for proc in procs:
                if not proc.alive():
                    raise StackError(
                        f"{proc.name} exited with {proc.popen.returncode} while starting"
                        f" ({proc.log_path}):\n{proc.log_tail()}"
                    )
            if check():
                return
            if time.monotonic() > deadline:
                logs = ", ".join(str(p.log_path) for p in procs)
                raise StackError(f"{what} did not come up within {within:.0f} s; see {logs}")
            time.sleep(0.05)

    # -- servers -----------------------------------------------------------------------------

    def _start_redis(self) -> None:
        server = RedisServer(
            self.root,
            appendfsync=self._appendfsync,
            log_path=self.logs / "redis.log",
            die_with_parent=True,
        )
        self._start_server(server)
        self.redis_url = server.url

    def _start_mysql(self) -> None:
        server = MariaDBServer(
            self.root,
            log_path=self.logs / "mariadb.log",
            buffer_pool="256M",
            log_file_size=None,
            max_connections=500,
            die_with_parent=True,
        )
        self._start_server(server)
        password = secrets.token_urlsafe(18)
        server.create_service_user(password=password, databases="coupon")
        self.mysql_url = server.url("coupon", password=password)

    def start_replicated_redis(self, name: str = "redis-replicated") -> tuple[str, str]:
        """A second Redis primary with one replica of its own (same AOF settings, loopback),
        stopped with the stack like the first; returns (primary URL, replica URL) once the
        replica is in sync and the primary counts it connected."""
        primary = RedisServer(
            self.root / name,
            appendfsync=self._appendfsync,
            log_path=self.logs / f"{name}.log",
            die_with_parent=True,
        )
        self._start_server(primary)
        replica = RedisServer(
            self.root / f"{name}-replica",
            appendfsync=self._appendfsync,
            log_path=self.logs / f"{name}-replica.log",
            die_with_parent=True,
            replica_of=primary.port,
        )
        self._start_server(replica)
        client = redis_sync.Redis(host=HOST, port=primary.port, socket_timeout=5.0)
        try:

            def in_sync() -> bool:
                info = client.info("replication")
                slave = info.get("slave0")
                return isinstance(slave, dict) and slave.get("state") == "online"

            wait_for(f"{replica.name} in sync with {primary.name}", in_sync, within=30)
        finally:
            client.close()
        return primary.url, replica.url

    def _start_server(self, server: Server) -> None:
        self._servers.append(server)
        server.start()
        self._server_records.append({"pid": server.pid, "name": server.name,
                                     "argv": server.command})  # fmt: skip

    # -- the service -------------------------------------------------------------------------

    def settings(self, **changes: object) -> Settings:
        """Settings for a process of this stack (JSON logs, our servers, our admin token)."""
        base = Settings(
            redis_url=self.redis_url,
            mysql_url=self.mysql_url,
            admin_token=self.admin_token,
            log_format="json",
        )
        return base.replace(**changes) if changes else base

    def env(self, settings: Settings, **extra: str) -> dict[str, str]:
        """A child environment: ours without any COUPON_*, plus ``settings`` and ``extra``."""
        return child_env(settings, **extra)

    def start_gateway(
        self,
        *,
        processes: int = 1,
        module: str = "gateway",
        name: str = "gateway",
        **changes: object,
    ) -> Service:
        """``processes`` gateway processes on one port, with a fresh multiprocess metrics
        folder when there is more than one; waits for /readyz. The gateway runs as it ships
        (several processes under supervisord with deploy/supervisord/gateway.conf); another
        module (a bare app) is started that often with the same port."""
        port = free_port()
        settings = self.settings(http_port=port, gateway_processes=processes, **changes)
        extra = {}
        if processes > 1:
            multiproc = self.root / f"prometheus-{name}-{port}"
            multiproc.mkdir()
            extra["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
        env = self.env(settings, **extra)
        if module == "gateway":
            command = gateway_command(processes, self.root / f"{name}-{port}.pid")
            procs = [self.spawn(f"{name}-{port}", command, env=env)]
        else:
            procs = [
                self.spawn(f"{name}-{port}-{i}", [PYTHON, "-m", module], env=env)
                for i in range(processes)
            ]
        url = f"http://127.0.0.1:{port}"
        self.wait_until(name, lambda: http_ok(f"{url}/readyz"), procs, 60)
        return Service(url, port, procs)

    def start_workers(self, count: int, **changes: object) -> list[Proc]:
        """``count`` workers (``python -m stream_worker``), each with its own metrics port."""
        procs = []
        for i in range(count):
            metrics_port = free_port()
            settings = self.settings(
                worker_name=f"stack-worker-{i}", worker_metrics_port=metrics_port, **changes
            )
            proc = self.spawn(
                f"worker-{i}", [PYTHON, "-m", "stream_worker"], env=self.env(settings)
            )
            proc.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            url = proc.metrics_url
            self.wait_until(f"worker {i}", lambda url=url: http_ok(url), [proc], 60)
            procs.append(proc)
        return procs


@contextlib.contextmanager
def stack(**kwargs: object) -> Iterator[Stack]:
    """``with stack() as s:`` — also stops everything on SIGTERM/SIGHUP."""
    raise_on_signals()
    with Stack(**kwargs) as running:  # type: ignore[arg-type]
        yield running
