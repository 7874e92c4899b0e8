"""A coupon's state in Redis: its consumer group, its snapshot, and the news that it changed.

Every gateway judges requests by the snapshot (``{coupon:ID}:meta``); every worker reads the
coupons listed in ``coupons:active``. :func:`publish_state` writes both and tells every process
at once (pub/sub), so it is the one way a coupon's state goes live: on creation, on a change
and after a rebuild.
"""

from __future__ import annotations

import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared import keys
from shared.errors import RedisStateLost
from shared.ids import id_or_none
from shared.model import Coupon

log = structlog.get_logger(__name__)


async def ensure_group(redis: Redis, coupon_id: int) -> None:
    """Create the request stream and its consumer group, reading from the very beginning."""
    try:
        await redis.xgroup_create(
            keys.CouponKeys(coupon_id).requests, keys.GROUP, id="0", mkstream=True
        )
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def publish_state(redis: Redis, coupon: Coupon) -> None:
    """Write the coupon's Redis snapshot and tell every gateway and worker about it.

    The snapshot is written after the group and the active set, so a coupon that is visible to
    the gateways is already read by the workers.
    """
    k = keys.CouponKeys(coupon.id)
    await ensure_group(redis, coupon.id)
    await redis.sadd(keys.ACTIVE_COUPONS, coupon.id)
    await redis.hset(k.meta, mapping=coupon.to_meta())  # type: ignore[arg-type]
    await redis.publish(keys.CHANGES_CHANNEL, coupon.id)


async def active_coupon_ids(redis: Redis) -> list[int]:
    """The coupons in ``coupons:active``, in id order: those the workers read, the monitor
    measures, the gateways shed by and the retirer looks at."""
    ids = []
    for raw in await redis.smembers(keys.ACTIVE_COUPONS):
        coupon_id = id_or_none(str(raw))
        if coupon_id is None:  # only an operator with Redis access can write junk
            log.warning("active_coupon_ignored", member=str(raw)[:64])
        else:
            ids.append(coupon_id)
    return sorted(ids)


async def load_snapshot(redis: Redis, coupon_id: int) -> Coupon | None:
    """The coupon as Redis knows it, or None when there is no such coupon.

    Raises :class:`RedisStateLost` when the coupon is missing because Redis lost its data
    (the state marker is gone too): "not found" would be a lie, and re-creating state would
    sell the stock a second time.
    """
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.CouponKeys(coupon_id).meta)
        pipe.exists(keys.STATE_MARKER)
        meta, marked = await pipe.execute()
    if not meta:
        if not marked:
            raise RedisStateLost("Redis lost the coupon state; an operator must rebuild it")
        return None
    return Coupon.from_meta({_text(k): _text(v) for k, v in meta.items()})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
