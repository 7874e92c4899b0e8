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
