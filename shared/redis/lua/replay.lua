#!lua
-- Re-queue a dead-lettered request: take a stock slot for its user again and XADD a new
-- request entry that keeps the original acceptance time. The window is not checked: the
-- request was accepted inside it, and only its processing failed.
--
-- KEYS[1]  {coupon:ID}:meta      HASH   total (-1 = unlimited)
-- KEYS[2]  {coupon:ID}:users     SET    users holding a stock slot
-- KEYS[3]  {coupon:ID}:requests  STREAM accepted requests
-- KEYS[4]  {coupon:ID}:failed    SET    users whose last request was dead-lettered
-- ARGV[1]  coupon id
-- ARGV[2]  user id
-- ARGV[3]  original acceptance time (ms)
-- ARGV[4]  the dead letter's source entry id (kept as field `r`)
--
-- Returns {code, new entry id}: 0 queued, 1 the user already holds a slot (nothing to do),
-- 2 no stock left, 3 the coupon has no Redis state, 4 the coupon is retired (or being retired).

local total = redis.call('HGET', KEYS[1], 'total')
if not total then
    return {3, ''}
end
if redis.call('HEXISTS', KEYS[1], 'retired_reserved') == 1 then
    return {4, ''}
end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then
    return {1, ''}
end
total = tonumber(total)
if total >= 0 and redis.call('SCARD', KEYS[2]) >= total then
    return {2, ''}
end
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SREM', KEYS[4], ARGV[2])
local id = redis.call('XADD', KEYS[3], '*', 'c', ARGV[1], 'u', ARGV[2], 't', ARGV[3], 'r', ARGV[4])
return {0, id}
