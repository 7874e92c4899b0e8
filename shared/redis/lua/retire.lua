#!lua
-- Seal a finished coupon for retirement: check, atomically, that its window ended at least
-- ARGV[1] ms ago (Redis time) and that every accepted request is settled, then record the
-- slots held in the snapshot (field retired_reserved). From then on the snapshot says
-- "retired": replay refuses it, and the caller may delete the rest of its state once MySQL
-- holds the retirement. Nothing can be accepted any more: the window is over.
--
-- KEYS[1]  {coupon:ID}:meta      HASH   the snapshot
-- KEYS[2]  {coupon:ID}:users     SET    users holding a stock slot
-- KEYS[3]  {coupon:ID}:requests  STREAM accepted requests
-- KEYS[4]  {coupon:ID}:dead      STREAM dead letters
-- KEYS[5]  {coupon:ID}:correction STRING requests the stream counts twice (a reconcile repair's
--                                        re-queued entries, minus rows a rebuild restored)
-- ARGV[1]  how long after the window's end (ms) the coupon may be retired
-- ARGV[2]  the consumer group
--
-- Returns one of:
--   {0}                              no Redis state for this coupon
--   {1, end_ms, now_ms}              too early: the window (plus the delay) has not ended
--   {2, pending, undelivered}        unsettled: requests wait for a worker (undelivered is
--                                    1 when some were never read, 0 otherwise)
--   {3, requested, reserved, dead}   sealed (or sealed before): the counters to keep; requested
--                                    counts each accepted request once (the correction off)

local function field(reply, name)
    for i = 1, #reply, 2 do
        if reply[i] == name then
            return reply[i + 1]
        end
    end
    return nil
end

local end_ms = redis.call('HGET', KEYS[1], 'end_ms')
if not end_ms then
    return {0}
end
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if now_ms < tonumber(end_ms) + tonumber(ARGV[1]) then
    return {1, tonumber(end_ms), now_ms}
end

local requested = 0
if redis.call('EXISTS', KEYS[3]) == 1 then
    local stream = redis.call('XINFO', 'STREAM', KEYS[3])
    -- entries-added counts every entry ever accepted (Redis 7); older servers only know the
    -- length, which is the same unless entries were deleted.
    requested = tonumber(field(stream, 'entries-added') or field(stream, 'length'))
        - tonumber(redis.call('GET', KEYS[5]) or '0')
    local last = field(stream, 'last-generated-id')
    for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[3])) do
        if field(group, 'name') == ARGV[2] then
            local pending = tonumber(field(group, 'pending'))
            local undelivered = field(group, 'last-delivered-id') ~= last and 1 or 0
            if pending > 0 or undelivered == 1 then
                return {2, pending, undelivered}
            end
        end
    end
end

local reserved = redis.call('HGET', KEYS[1], 'retired_reserved')
if not reserved then
    reserved = redis.call('SCARD', KEYS[2])
    redis.call('HSET', KEYS[1], 'retired_reserved', reserved)
end
return {3, requested, tonumber(reserved), redis.call('XLEN', KEYS[4])}
