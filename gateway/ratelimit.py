"""Rate limits of the issue routes, per client address and per user, kept in process.

Each key (a client address, a user id) has a GCRA bucket (the "generic cell rate algorithm",
a token bucket stored as ONE float: the theoretical arrival time of the next request). A
request costs one dict pop and one insert, no Redis round trip, so the limiter is nearly free
on the hot path (tests/bench/ratelimit_cost.py measures it). A refused request consumes nothing.

Memory is bounded: the keys are kept in least-recently-used order (every hit moves its key to
the end); each new key first drops up to two idle keys from the old end (a key whose bucket has
refilled is the same as an absent one), and beyond ``max_keys`` the least recently used key
is dropped even if not idle (that client merely gets a fresh bucket).

The limits are per gateway process. With N processes behind one port (``reuse_port``), a client
spreading requests over several connections can reach up to N times the configured rate; one
keep-alive connection always lands on one process. Configure per-process values accordingly.

The client address is the TCP peer, unless the peer is a trusted proxy
(``COUPON_TRUSTED_PROXIES``): then ``X-Forwarded-For`` is read from the right, skipping trusted
proxies, and the first address that is not one is the client. A header from anyone else is
ignored, so it cannot be spoofed to dodge the limit. IPv6 clients are limited per /64 (one
subscriber's allocation), or rotating addresses would make the limit meaningless.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from aiohttp import web

from shared.errors import RateLimited
from shared.settings import IpNetwork, Settings

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RateLimiter:
    """GCRA buckets: ``per_second`` sustained, ``burst`` at once, at most ``max_keys`` keys."""

    def __init__(
        self,
        per_second: float,
        burst: int,
        *,
        max_keys: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_second <= 0 or burst < 0 or max_keys <= 0:
            raise ValueError("per_second and max_keys must be positive, burst 0 or more")
        self._interval = 1.0 / per_second
        # 0 means "as many as one second allows", never less than one request.
        self.burst = burst or max(1, math.ceil(per_second))
        self._tolerance = self.burst * self._interval
        self._max_keys = max_keys
        self._clock = clock
        # An OrderedDict, not a dict: a dict whose oldest entries keep being deleted scans the
        # dead slots on every next(iter()), which made a new key cost ~50 us once full.
        self._arrivals: OrderedDict[Hashable, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._arrivals)

    def hit(self, key: Hashable) -> float:
        """Count one request for ``key``: 0.0 when allowed, else the seconds to wait."""
        now = self._clock()
        arrivals = self._arrivals
        arrival = arrivals.get(key)
        if arrival is None:
            self._make_room(now)
            arrival = now
        else:
            arrivals.move_to_end(key)
            arrival = max(arrival, now)
        wait = arrival + self._interval - self._tolerance - now
        if wait > 0:
            arrivals[key] = arrival
            return wait
        arrivals[key] = arrival + self._interval
        return 0.0

    def _make_room(self, now: float) -> None:
        arrivals = self._arrivals
        # Amortised sweep: the oldest keys are the likeliest to be idle (bucket full again).
        for _ in range(2):
            oldest = next(iter(arrivals), None)
            if oldest is None or arrivals[oldest] > now:
                break
            del arrivals[oldest]
        if len(arrivals) >= self._max_keys:
            arrivals.popitem(last=False)


class ClientAddresses:
    """The rate-limit key of a request's client, honouring X-Forwarded-For from trusted proxies."""

    def __init__(self, trusted: tuple[IpNetwork, ...]) -> None:
        self._trusted = trusted

    def key(self, request: web.Request) -> str:
        peer = request.remote or ""
        if not self._trusted:
            return _address_key(peer)
        address = _parse(peer)
        if address is None or not self._is_trusted(address):
            return _address_key(peer)
        forwarded = ",".join(request.headers.getall("X-Forwarded-For", ()))
        for hop in reversed(forwarded.split(",")):
            if not self._is_trusted(address):
                break
            parsed = _parse(hop)
            if parsed is None:
                # Unreadable: the last trusted hop is the best-known client.
                break
            address = parsed
        return _address_key(str(address))

    def _is_trusted(self, address: IpAddress) -> bool:
        return any(address in network for network in self._trusted)


def _parse(raw: str) -> IpAddress | None:
    """An address from a peer or an X-Forwarded-For entry (``[v6]:port`` and ``v4:port`` too)."""
    text = raw.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _address_key(address: str) -> str:
    if ":" not in address:
        return address
    parsed = _parse(address)
    if parsed is None:
        return address
    if isinstance(parsed, ipaddress.IPv4Address):
        return str(parsed)
    return str(ipaddress.IPv6Network((parsed, 64), strict=False))


class Limits:
    """The two limits of the issue routes, and the per-address limit of the public read routes
    (coupon snapshot and request status); each is off when its rate is 0."""

    def __init__(self, settings: Settings) -> None:
        self.by_address = _limiter(
            settings.rate_limit_ip_per_second,
            settings.rate_limit_ip_burst,
            settings.rate_limit_max_keys,
        )
        self.by_user = _limiter(
            settings.rate_limit_user_per_second,
            settings.rate_limit_user_burst,
            settings.rate_limit_max_keys,
        )
        self.by_reader = _limiter(
            settings.rate_limit_read_per_second,
            settings.rate_limit_read_burst,
            settings.rate_limit_max_keys,
        )
        self.addresses = ClientAddresses(settings.trusted_proxy_networks)

    def check_client(self, request: web.Request) -> None:
        if self.by_address is not None:
            _refuse_if_limited(
                self.by_address, self.addresses.key(request),
                "too many issue requests from this client address",
            )  # fmt: skip

    def check_reader(self, request: web.Request) -> None:
        if self.by_reader is not None:
            _refuse_if_limited(
                self.by_reader, self.addresses.key(request),
                "too many read requests from this client address",
            )  # fmt: skip

    def check_user(self, user_id: int) -> None:
        if self.by_user is not None:
            _refuse_if_limited(self.by_user, user_id, "too many issue requests for user {key}")


def _refuse_if_limited(limiter: RateLimiter, key: Hashable, detail: str) -> None:
    """429 with the seconds to wait when ``key`` is over its limit; counts the hit otherwise.
    ``detail`` may name ``{key}``; it is formatted only for a refusal, off the common path."""
    wait = limiter.hit(key)
    if wait:
        raise RateLimited(detail.format(key=key), retry_after=math.ceil(wait))


def _limiter(per_second: float, burst: int, max_keys: int) -> RateLimiter | None:
    return RateLimiter(per_second, burst, max_keys=max_keys) if per_second > 0 else None
