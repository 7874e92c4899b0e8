"""A small asyncio HTTP client that sends an exact list of issue requests and remembers, per
user, what it was told: the end-to-end benchmark needs every answer, which wrk cannot give."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Fired:
    """What the clients saw."""

    statuses: Counter[int] = field(default_factory=Counter)
    accepted: list[int] = field(default_factory=list)
    """Users answered 202."""
    unknown: list[int] = field(default_factory=list)
    """Users whose request failed without a definite answer (5xx, reset, timeout)."""
    errors: int = 0
    """Requests that got no HTTP answer at all."""
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + self.errors


async def fire(
    base_url: str,
    coupon_id: int,
    user_ids: Sequence[int],
    *,
    concurrency: int,
    request_timeout: float = 10.0,
) -> Fired:
    """POST ``/v1/coupons/{coupon_id}/issues`` once per user id, ``concurrency`` at a time."""
    fired = Fired()
    url = f"{base_url}/v1/coupons/{coupon_id}/issues"
    position = iter(range(len(user_ids)))
    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=request_timeout)

    async def one_connection(session: aiohttp.ClientSession) -> None:
        for index in position:
            user = user_ids[index]
            try:
                async with session.post(url, json={"user_id": user}) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                fired.errors += 1
                fired.unknown.append(user)
                continue
            fired.statuses[status] += 1
            if status == 202:
                fired.accepted.append(user)
            elif status >= 500:
                fired.unknown.append(user)

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        await asyncio.gather(*(one_connection(session) for _ in range(concurrency)))
    fired.seconds = time.perf_counter() - started
    return fired
