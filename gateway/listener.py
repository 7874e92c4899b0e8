"""Listening sockets that take a drop's flood of new connections at once.

uvloop's libuv (since 1.45, libuv pull request 3696) accepts one connection per event-loop
iteration. That is right for a quiet server, and wrong at the start of a drop: thousands of
clients connect within a second, the loop is busy answering the connections it already has
(one iteration lasts tens of milliseconds), and the rest wait in the kernel's accept queue at
about 20 accepts a second. Measured on the bench machine with 5,000 clients, 700 to 1,100 of
them were still in the queue ten seconds later, with a bare aiohttp endpoint as with the
gateway; their requests were neither answered nor, by the load generator, counted.

:class:`EagerAcceptSite` therefore watches the listening socket itself and accepts everything
queued (up to :data:`ACCEPT_BATCH` per wake-up, so one wake-up holds the loop a few
milliseconds at most; the reader is level-triggered and comes back at the next iteration),
then hands each connection to aiohttp through ``loop.connect_accepted_socket``, as the standard
library's loop does with its own accept loop. :func:`serve` runs an application on it with the
lifecycle of ``aiohttp.web.run_app``, which cannot take a custom site.
"""

from __future__ import annotations

import asyncio
import signal
import socket

import structlog
import uvloop
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from gateway.problems import SERVER, internal_error, problem_response

log = structlog.get_logger(__name__)

ACCEPT_BATCH = 512
"""Connections accepted per wake-up of the listening socket (about 10 ms of work)."""
ACCEPT_RETRY_SECONDS = 1.0
"""Pause after accept() failed for want of file descriptors or memory, as asyncio does."""


def listening_socket(host: str, port: int, *, backlog: int, reuse_port: bool) -> socket.socket:
    """A bound, listening, non-blocking TCP socket; ``reuse_port`` lets several gateway
    processes listen on one port (the kernel spreads new connections among them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, except for the answer to a request it cannot parse (or
    an error outside every middleware): a fixed problem+json body per status instead of
    aiohttp's text, which repeats the offending bytes (a 100 KB header came back whole), and
    a log line that names the error's class, not its text."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        # Logged by class only: aiohttp's own line would hold the attacker's bytes (a 100 KB
        # header per request fills a disk).
        if status < 500:
            log.warning("http_error", status=status, error=type(exc).__name__ if exc else None)
        else:  # outside every middleware: keep the traceback (rendered without locals)
            log.error("http_error", status=status, exc_info=exc)
        if request.writer.output_size > 0:  # part of an answer is out: nothing more to send
            raise ConnectionError("the response was already started")
        if status < 500:
            response = problem_response(
                status, "INVALID_REQUEST", "Malformed HTTP request",
                "the request could not be parsed as HTTP/1.1",
            )  # fmt: skip
        else:
            response = internal_error(status)
        response.headers["Server"] = SERVER
        response.force_close()
        return response


class EagerAcceptSite(web.BaseSite):
    """An aiohttp site on a listening socket that accepts every queued connection at once."""

    __slots__ = ("_handshakes", "_loop", "_name", "_retry", "_sock")

    def __init__(self, runner: web.BaseRunner, sock: socket.socket) -> None:
        super().__init__(runner)
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self._name = f"http://{host}:{port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handshakes: set[asyncio.Task[object]] = set()
        self._retry: asyncio.TimerHandle | None = None

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._accept_queued)

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        if self._retry is not None:
            self._retry.cancel()
        self._sock.close()
        await super().stop()

    def _accept_queued(self) -> None:
        assert self._loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # the queue is empty
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM
                log.warning("accept_failed", error=str(exc), retry_in_s=ACCEPT_RETRY_SECONDS)
                self._loop.remove_reader(self._sock.fileno())
                self._retry = self._loop.call_later(ACCEPT_RETRY_SECONDS, self._resume)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn))
            self._handshakes.add(task)  # a task nobody refers to may be collected mid-way
            task.add_done_callback(self._handshakes.discard)

    def _resume(self) -> None:
        assert self._loop is not None
        self._retry = None
        self._loop.add_reader(self._sock.fileno(), self._accept_queued)

    async def _connect(self, conn: socket.socket) -> None:
        loop, server = self._loop, self._runner.server
        assert loop is not None
        assert server is not None
        try:
            # aiohttp's Server builds a RequestHandler with the runner's options (its _kwargs:
            # keep-alive, access log); ours differs only in how it answers unparsable requests.
            await loop.connect_accepted_socket(
                lambda: ProblemRequestHandler(server, loop=loop, **server._kwargs), conn
            )
        except OSError:  # reset between accept and hand-over: nothing to serve
            conn.close()


def serve(
    app: web.Application,
    sock: socket.socket,
    *,
    shutdown_timeout: float,
    keepalive_timeout: float,
    lingering_time: float = 10.0,
) -> None:
    """Serve ``app`` on ``sock`` under uvloop until SIGTERM or SIGINT, then shut down as
    ``web.run_app`` does: stop listening, let requests in flight finish within
    ``shutdown_timeout``, run the application's cleanup, cancel what is left. An idle
    connection is closed after ``keepalive_timeout`` (aiohttp's own default is an hour); after
    an answer that left part of the body unread, the rest is read (and dropped) for at most
    ``lingering_time`` before the connection closes."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(app, sock, shutdown_timeout, keepalive_timeout, lingering_time))


async def _serve(
    app: web.Application,
    sock: socket.socket,
    shutdown_timeout: float,
    keepalive_timeout: float,
    lingering_time: float,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=keepalive_timeout,
        lingering_time=lingering_time,
    )
    await runner.setup()  # on_startup and cleanup_ctx: Redis, MySQL, the admin listener
    try:
        await EagerAcceptSite(runner, sock).start()
        await stop.wait()
    finally:
        await runner.cleanup()
        sock.close()
