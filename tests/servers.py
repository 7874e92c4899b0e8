"""The real servers the tests and the benchmarks run on, started in one way for all of them.

- :func:`find_binary` and :func:`free_port`: where a server program is, and a loopback port;
- :class:`RedisServer`: a private ``redis-server`` with AOF on (``appendfsync`` always or
  everysec) and ``noeviction``, its data in a folder of its own, restartable on that data;
- :class:`MariaDBServer`: a private ``mariadbd``, installed (``mariadb-install-db``) into a
  folder of its own on its first start; root logs in through its unix socket;
- :func:`create_service_user`: the service's account, made from the same SQL file as the
  database image's (``deploy/mysql/initdb.d/service-user.sql.template``).

Users: the benchmark stack (``tests/bench/stack.py``), the fault harness
(``tests/fault/harness.py``, which adds signals and restarts under load) and the session
fixtures (``tests/conftest.py``, whose servers pytest-redis and pytest-mysql start).

Each server runs under a mirakuru executor in a process group of its own, its output in a log
file, so a signal reaches all of it and its owner can always stop what it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import port_for
import pymysql
import redis as redis_sync
from mirakuru import TCPExecutor
from redis.exceptions import RedisError

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SERVICE_USER_TEMPLATE = REPO / "deploy" / "mysql" / "initdb.d" / "service-user.sql.template"
# The tests' service account; its rights cover every database whose name starts "coupon_".
MYSQL_USER, MYSQL_PASSWORD = "coupon", "coupon-test-password"
TEST_DATABASES = "coupon\\_%"
REDIS_START_TIMEOUT = 30.0
CLUSTER_NODE_TIMEOUT_MS = 1000
"""How long a cluster master may stay silent before its replica takes over (tests only; the
default is 15 s)."""
# Also how long a stop may take before SIGKILL; a crash recovery takes longer than Redis's.
MARIADB_START_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` of a process's log file ("" when there is none yet), for failures."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ServerError(RuntimeError):
    """A server could not be started; the message names its log."""


def find_binary(*names: str) -> str:
    """The first of ``names`` installed, also in the sbin folders a normal user's PATH lacks."""
    for name in names:
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
        if found:
            return found
    raise ServerError(f"none of {names} is installed; ./scripts/test installs them")


def free_port() -> int:
    """A free loopback port outside the ephemeral range, so that no outgoing connection takes
    it while a killed server is down and about to be started again on it."""
    return int(port_for.select_random())


def os_user() -> str:
    """The user this process runs as: the servers run as it, and it is their socket admin."""
    return pwd.getpwuid(os.getuid()).pw_name


def http_ok(url: str) -> bool:
    """GET ``url`` answers 200 now (a server still starting answers nothing)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - our loopback
            return bool(response.status == 200)
    except OSError:
        return False


def wait_for(what: str, condition: Callable[[], bool], *, within: float) -> None:
    """Poll ``condition`` until true; a ServerError after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise ServerError(f"{what} not within {within:.0f} s")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# The service's MySQL account

_ALLOWED = {
    "user": r"[A-Za-z0-9_]+",
    "host": r"[A-Za-z0-9.%_-]+",
    "password": r"[A-Za-z0-9._~-]+",
    "databases": r"[A-Za-z0-9_%\\]+",
}


def service_user_statements(*, user: str, password: str, databases: str, host: str) -> list[str]:
    """The statements of the template, values filled in. ``databases`` is a grant pattern
    (``_`` and ``%`` are wildcards; ``\\_`` is a plain underscore)."""
    values = {"user": user, "host": host, "password": password, "databases": databases}
    for name, value in values.items():
        # The values go into the SQL as text, as the shell script puts them: only safe ones.
        if not re.fullmatch(_ALLOWED[name], value):
            raise ValueError(f"{name} has a character outside the allowed set")
    lines = SERVICE_USER_TEMPLATE.read_text(encoding="utf-8").splitlines()
    sql = "\n".join(line for line in lines if not line.lstrip().startswith("--"))
    for name, value in values.items():
        sql = sql.replace(f"{{{{{name}}}}}", value)
    return [statement.strip() for statement in sql.split(";") if statement.strip()]


def create_service_user(
    unix_socket: str | Path,
    *,
    user: str = MYSQL_USER,
    password: str = MYSQL_PASSWORD,
    databases: str = TEST_DATABASES,
    host: str = HOST,
    may_drop: bool = False,
    admin: str | None = None,
) -> None:
    """Make the service's account over TCP from ``host``, as the administrator logged in through
    the server's unix socket (MariaDB's root authenticates by socket credentials).

    ``may_drop`` adds DROP for tests that remove the databases they made; the service itself
    never drops anything, so the deployed account has no such right.
    """
    statements = service_user_statements(
        user=user, password=password, databases=databases, host=host
    )
    if may_drop:
        statements.append(f"GRANT DROP ON `{databases}`.* TO '{user}'@'{host}'")
    conn = pymysql.connect(unix_socket=str(unix_socket), user=admin or os_user())
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# The servers


def die_with_parent() -> None:
    """For ``preexec_fn``: runs in the child between fork and exec. If this process dies, even
    by SIGKILL, the kernel sends the child SIGTERM, so an interrupted benchmark never leaves
    servers behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _new_session_dying_with_parent() -> None:
    os.setsid()  # what mirakuru does: its own process group, for signals to all of it
    die_with_parent()


class _Executor(TCPExecutor):
    """mirakuru's executor (ready when the port accepts), optionally tied to our life.

    The kernel ties the child to the thread that started it, so only a caller that starts
    servers from a thread living as long as it wants them asks for that.
    """

    def __init__(self, *args: Any, die_with_parent: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._die_with_parent = die_with_parent

    @property
    def _popen_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = super()._popen_kwargs
        if self._die_with_parent:
            kwargs["preexec_fn"] = _new_session_dying_with_parent
        return kwargs


class Server:
    """One server process under a mirakuru executor, its output appended to ``log_path``."""

    def __init__(
        self,
        name: str,
        port: int,
        command: list[str],
        log_path: Path,
        *,
        timeout: float,
        die_with_parent: bool,
    ) -> None:
        self.name = name
        self.port = port
        self.command = command
        self.log_path = log_path
        self.log: IO[str] = log_path.open("a", buffering=1)
        self.executor = _Executor(
            command,
            host=HOST,
            port=port,
            timeout=timeout,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            die_with_parent=die_with_parent,
        )

    @property
    def pid(self) -> int:
        process = self.executor.process
        if process is None:
            raise ServerError(f"{self.name} is not running")
        return int(process.pid)

    @property
    def running(self) -> bool:
        return bool(self.executor.running())

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        try:
            self.executor.start()
        except Exception as exc:
            raise ServerError(
                f"{self.name} did not start ({exc}); {self.log_path}:\n{self.log_tail()}"
            ) from exc

    def stop(self) -> None:
        """SIGTERM the process group; SIGKILL what is left after the start timeout."""
        with contextlib.suppress(ProcessLookupError):
            self.executor.stop()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the process group and reap it; it can be started again afterwards."""
        self.executor.kill(sig=sig)

    def close(self) -> None:
        """Stop for good and close the log."""
        try:
            self.stop()
        finally:
            self.log.close()

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)


class RedisServer(Server):
    """A private redis-server: AOF on, ``noeviction`` (the service refuses an evicting Redis),
    no RDB snapshots, loopback only; its data in ``workdir/redis``. With ``replica_of`` (a
    port on loopback) it starts as that server's replica; with ``cluster`` as a Redis Cluster
    node (its ``nodes.conf`` in the data folder, so a restart rejoins)."""

    def __init__(
        self,
        workdir: Path,
        *,
        appendfsync: str = "always",
        log_path: Path | None = None,
        die_with_parent: bool = False,
        replica_of: int | None = None,
        cluster: bool = False,
    ) -> None:
        port = free_port()
        self.data_dir = workdir / "redis"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.appendfsync = appendfsync
        command = [
            find_binary("redis-server"),
            "--port", str(port),
            "--bind", HOST,
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", appendfsync,
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
        ]  # fmt: skip
        if replica_of is not None:
            command += ["--replicaof", HOST, str(replica_of)]
        if cluster:
            # The bus port would default to port + 10000, which may be taken: a free one too.
            command += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
            ]  # fmt: skip
        super().__init__(
            f"redis:{port}",
            port,
            command,
            log_path or workdir / "redis.log",
            timeout=REDIS_START_TIMEOUT,
            die_with_parent=die_with_parent,
        )

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        super().start()
        # Redis listens before it has replayed the AOF; it answers LOADING until then.
        client = redis_sync.Redis(host=HOST, port=self.port, socket_timeout=5.0)
        try:
            wait_for(f"{self.name} loaded", lambda: _pings(client), within=REDIS_START_TIMEOUT)
        finally:
            client.close()

    def wipe(self) -> None:
        """Remove its data (while it is stopped): the next start begins empty."""
        shutil.rmtree(self.data_dir)
        self.data_dir.mkdir()


SENTINEL_MASTER = "coupon"
SENTINEL_DOWN_AFTER_MS = 1000
"""How long a primary must stay silent before the sentinels call it down: short, so a test's
failover takes seconds (production uses the default 30 s or a few seconds)."""


class SentinelServer(Server):
    """``redis-server --sentinel`` watching the primary on ``primary_port`` as
    :data:`SENTINEL_MASTER` (quorum 2, so three of them decide a failover). Its config file is
    its own: a sentinel rewrites it with what it learns."""

    def __init__(
        self, workdir: Path, *, primary_port: int, quorum: int = 2, die_with_parent: bool = False
    ) -> None:
        port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / f"sentinel-{port}.conf"
        config.write_text(
            "\n".join(
                [
                    f"port {port}",
                    f"bind {HOST}",
                    "daemonize no",
                    f"dir {workdir}",
                    f"sentinel monitor {SENTINEL_MASTER} {HOST} {primary_port} {quorum}",
                    f"sentinel down-after-milliseconds {SENTINEL_MASTER} {SENTINEL_DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {SENTINEL_MASTER} 10000",
                    f"sentinel parallel-syncs {SENTINEL_MASTER} 1",
                    "",
                ]
            )
        )
        super().__init__(
            f"sentinel:{port}",
            port,
            [find_binary("redis-server"), str(config), "--sentinel"],
            workdir / f"sentinel-{port}.log",
            timeout=REDIS_START_TIMEOUT,
            die_with_parent=die_with_parent,
        )

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def _pings(client: redis_sync.Redis) -> bool:
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False


class MariaDBServer(Server):
    """A private mariadbd: data in ``workdir/mysql``, its socket and its own temporary folder
    beside it, every COMMIT on disk, loopback only.

    The first :meth:`start` installs the data folder. ``buffer_pool``, ``log_file_size`` and
    ``max_connections`` size it: small for tests, larger for the benchmarks.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        log_path: Path | None = None,
        buffer_pool: str = "32M",
        log_file_size: str | None = "16M",
        max_connections: int | None = None,
        die_with_parent: bool = False,
    ) -> None:
        port = free_port()
        self.data_dir = workdir / "mysql"
        # Unix socket paths are short (108 bytes): the caller keeps ``workdir`` short.
        self.socket = workdir / "mysqld.sock"
        # Its own temporary folder: two bootstraps sharing /tmp can collide on table names.
        self.tmp_dir = workdir / "mysql-tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.installed = False
        self._user = os_user()
        self._log_file_size = log_file_size
        command = [
            find_binary("mariadbd", "mysqld"),
            "--no-defaults",
            f"--datadir={self.data_dir}",
            f"--socket={self.socket}",
            f"--port={port}",
            f"--bind-address={HOST}",
            f"--user={self._user}",
            f"--pid-file={workdir / 'mysqld.pid'}",
            f"--tmpdir={self.tmp_dir}",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--performance-schema=OFF",
            f"--innodb-buffer-pool-size={buffer_pool}",
            # The durability the service is documented with: every COMMIT is on disk.
            "--innodb-flush-log-at-trx-commit=1",
        ]
        if log_file_size is not None:
            command.append(f"--innodb-log-file-size={log_file_size}")
        if max_connections is not None:
            command.append(f"--max-connections={max_connections}")
        super().__init__(
            f"mariadb:{port}",
            port,
            command,
            log_path or workdir / "mysql.log",
            timeout=MARIADB_START_TIMEOUT,
            die_with_parent=die_with_parent,
        )

    def url(self, database: str, user: str = MYSQL_USER, password: str = MYSQL_PASSWORD) -> str:
        return f"mysql://{user}:{password}@{HOST}:{self.port}/{database}"

    def start(self) -> None:
        """Install on the first start; ready when root can log in through the socket."""
        if not self.installed:
            self._install()
            self.installed = True
        super().start()
        wait_for(f"{self.name} login", self._socket_login, within=MARIADB_START_TIMEOUT)

    def create_service_user(self, **options: Any) -> None:
        """:func:`create_service_user` on this server (the tests' account unless told)."""
        create_service_user(self.socket, admin=self._user, **options)

    def _install(self) -> None:
        command = [
            find_binary("mariadb-install-db", "mysql_install_db"),
            "--no-defaults",
            f"--datadir={self.data_dir}",
            f"--user={self._user}",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
        ]
        if self._log_file_size is not None:
            command.append(f"--innodb-log-file-size={self._log_file_size}")
        done = subprocess.run(
            command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, TMPDIR=str(self.tmp_dir)),
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise ServerError(f"mariadb-install-db failed; {self.log_path}:\n{self.log_tail()}")

    def _socket_login(self) -> bool:
        try:
            pymysql.connect(
                unix_socket=str(self.socket), user=self._user, connect_timeout=1
            ).close()
        except pymysql.err.MySQLError:
            return False
        return True
