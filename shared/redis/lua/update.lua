#!lua
-- Apply an admin change to a coupon's Redis snapshot, atomically with the stock check.
--
-- KEYS[1]  {coupon:ID}:meta   HASH  the snapshot the issue script judges by
-- KEYS[2]  {coupon:ID}:users  SET   users holding a stock slot
-- ARGV[1]  new total (-1 = unlimited)
-- ARGV[2]  pub/sub channel gateways listen on
-- ARGV[3]  coupon id (the message published)
-- ARGV[4..] field, value, field, value, ... for the meta hash
--
-- Returns {status, reserved}: status 1 = applied, 0 = refused because the new total is below
-- the slots already promised, -1 = the coupon has no Redis state (it must be rebuilt, not
-- re-created empty, or it would sell its stock a second time).

if redis.call('EXISTS', KEYS[1]) == 0 then
    return {-1, 0}
end
local reserved = redis.call('SCARD', KEYS[2])
local total = tonumber(ARGV[1])
if total >= 0 and reserved > total then
    return {0, reserved}
end
local pairs = {}
for i = 4, #ARGV do
    pairs[#pairs + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(pairs))
-- The caller holds the coupon's MySQL row and found it not retired: a seal left by a
-- retirement that did not reach MySQL is void.
redis.call('HDEL', KEYS[1], 'retired_reserved')
redis.call('PUBLISH', ARGV[2], ARGV[3])
return {1, reserved}
