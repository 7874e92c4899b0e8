"""A Server-Sent Events reader for the tests, over an aiohttp response (the HTML standard's
parsing rules, as much of them as the feed uses: event, id, data, retry, comments)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson


@dataclass(frozen=True)
class Event:
    name: str
    id: str
    data: dict[str, Any]


class EventReader:
    """Events of one stream, in order; comments are counted, ``retry`` kept."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        assert response.status == 200, response.status
        assert response.headers["Content-Type"].startswith("text/event-stream")
        self._content = response.content
        self.retry_ms: int | None = None
        self.comments = 0

    async def next(self, *, within: float = 5.0) -> Event | None:
        """The next event, or None when the server ended the stream."""
        return await asyncio.wait_for(self._read_event(), within)

    async def until(self, name: str, *, within: float = 5.0) -> tuple[Event, list[Event]]:
        """Read up to the first ``name`` event; also return every event read on the way."""
        seen: list[Event] = []
        async with asyncio.timeout(within):
            while True:
                event = await self._read_event()
                assert event is not None, f"the stream ended before {name!r}; saw {seen}"
                seen.append(event)
                if event.name == name:
                    return event, seen

    async def _read_event(self) -> Event | None:
        fields: dict[str, str] = {}
        while True:
            raw = await self._content.readline()
            if not raw:
                return None
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in fields:
                    return Event(
                        fields.get("event", "message"), fields.get("id", ""),
                        orjson.loads(fields["data"]),
                    )  # fmt: skip
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "retry":
                self.retry_ms = int(value)
            else:
                fields[name] = value


class RawSubscriber:
    """One feed connection on a bare socket, cheap enough to hold thousands of in one test
    process: it only looks for an event's name in what arrives (each event comes whole, in one
    chunk of the chunked response)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._seen = b""

    @classmethod
    async def open(cls, host: str, port: int, path: str) -> RawSubscriber:
        """Connect and read up to the first event (the snapshot)."""
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        subscriber = cls(reader, writer)
        if status != 200:
            subscriber.close()
            raise AssertionError(f"GET {path}: {status}")
        await subscriber.until(b"snapshot")
        return subscriber

    async def until(self, name: bytes) -> None:
        """Read until an event called ``name`` has arrived."""
        marker = b"event: " + name + b"\n"
        while (at := self._seen.find(marker)) < 0:
            chunk = await self._reader.read(65536)
            if not chunk:
                raise AssertionError(f"the stream ended before {name!r}")
            self._seen = self._seen[-len(marker) :] + chunk  # all a marker can straddle
        self._seen = self._seen[at + len(marker) :]

    def close(self) -> None:
        self._writer.close()
