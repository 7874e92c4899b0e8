"""The gateway's one pub/sub subscription: news that a coupon changed or sold out.

``coupons:changed`` (a coupon's snapshot or stock changed: creation, an admin change, a released
slot, a rebuild) and ``coupons:sold_out`` (``issue.lua`` took the last slot) reach every process
within a round trip. Each message names a coupon id and goes to the handlers registered for its
channel, in order: the snapshot cache forgets the coupon, and the live feed reads a sold-out
coupon at once (it reads every other change at its next poll).
Whenever the subscription is (re)made or drops, messages may have been missed, so every
handler's ``resync`` runs too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import keys

log = structlog.get_logger(__name__)


def _ignore(*_: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Handler:
    """What one consumer of the news does with it (nothing, for what it leaves out)."""

    changed: Callable[[int], None] = _ignore
    sold_out: Callable[[int], None] = _ignore
    resync: Callable[[], None] = _ignore


async def listen(redis: Redis, handlers: list[Handler], stop: asyncio.Event) -> None:
    """Apply the messages of both channels until ``stop`` is set; reconnects with backoff."""
    delay = 0.1
    while not stop.is_set():
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(keys.CHANGES_CHANNEL, keys.SOLD_OUT_CHANNEL)
            _resync(handlers)  # anything may have changed while we were not subscribed
            delay = 0.1
            while not stop.is_set():
                message = await pubsub.get_message(timeout=0.2)
                if message is not None and message["type"] == "message":
                    _dispatch(handlers, message["channel"], message["data"])
        except (RedisError, OSError) as exc:
            log.warning("change_listener_disconnected", error=repr(exc))
            _resync(handlers)
            await wait(stop, delay)
            delay = min(delay * 2, 2.0)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]


def _resync(handlers: list[Handler]) -> None:
    for handler in handlers:
        handler.resync()


def _dispatch(handlers: list[Handler], channel: str | bytes, data: str | bytes) -> None:
    try:
        coupon_id = int(data)
    except ValueError:
        log.warning("change_message_ignored", data=repr(data)[:64])
        return
    name = channel.decode() if isinstance(channel, bytes) else channel
    for handler in handlers:
        if name == keys.SOLD_OUT_CHANNEL:
            handler.sold_out(coupon_id)
        else:
            handler.changed(coupon_id)


async def wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``stop`` is set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
