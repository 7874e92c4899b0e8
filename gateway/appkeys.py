"""Everything a handler needs, hung off the application under typed keys declared here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiomysql
from aiohttp import web
from redis.asyncio import Redis

from shared.redis.scripts import Scripts
from shared.settings import Settings

if TYPE_CHECKING:
    from gateway.auth import Authenticator
    from gateway.coalescer import Coalescer
    from gateway.console import Console
    from gateway.feed import Feed
    from gateway.issuing import Issuer
    from gateway.ratelimit import Limits
    from gateway.snapshots import SnapshotCache

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
MYSQL = web.AppKey("mysql", aiomysql.Pool)
SCRIPTS = web.AppKey("scripts", Scripts)
SNAPSHOTS: web.AppKey[SnapshotCache] = web.AppKey("snapshots")
COALESCER: web.AppKey[Coalescer] = web.AppKey("coalescer")
ISSUER: web.AppKey[Issuer] = web.AppKey("issuer")
FEED: web.AppKey[Feed] = web.AppKey("feed")
CONSOLE: web.AppKey[Console] = web.AppKey("console")
AUTHENTICATOR: web.AppKey[Authenticator] = web.AppKey("authenticator")
LIMITS: web.AppKey[Limits] = web.AppKey("limits")
