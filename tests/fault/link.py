"""A TCP link the test holds: a replica's replication connection goes through it, so the test
can make the replica fall behind for certain.

Freezing a replica (SIGSTOP) does not do that: the kernel keeps receiving the replication
stream into the frozen process's socket buffer (megabytes of it), and a replica resumed after
its primary died still reads everything the primary sent. A held link stops reading from the
primary instead, and a cut link closes both sides, so whatever the primary sent meanwhile never
arrives: a network partition between the two, as Jepsen makes one.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.servers import HOST, free_port


class HeldLink:
    """Forwards every connection on its port to ``HOST:target_port``; :meth:`hold` stops the
    target-to-client direction, :meth:`cut` drops every connection and what it held."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connected, HOST, self.port)

    def hold(self) -> None:
        """Stop passing on what the target sends (the client falls behind)."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Close every connection: what was held is gone. New connections flow again."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self._flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connected(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        try:
            target_r, target_w = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, target_w))
        for task in (
            asyncio.create_task(self._pump(target_r, client_w, held=True)),
            asyncio.create_task(self._pump(client_r, target_w, held=False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, held: bool
    ) -> None:
        try:
            while True:
                if held:
                    await self._flowing.wait()
                data = await source.read(65536)
                if not data:
                    break
                if held and not self._flowing.is_set():
                    # Read just before a hold: it is what the hold keeps back, so it is kept
                    # until released, or lost with a cut like the rest.
                    await self._flowing.wait()
                    if sink.transport.is_closing():
                        break
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                sink.transport.abort()
