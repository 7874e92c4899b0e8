#!lua
-- Reserve coupons for a batch of users of ONE coupon, atomically.
--
-- KEYS[1]  {coupon:ID}:meta      HASH  total (-1 = unlimited), start_ms, end_ms, paused
-- KEYS[2]  {coupon:ID}:users     SET   users holding a stock slot
-- KEYS[3]  {coupon:ID}:requests  STREAM accepted requests
-- KEYS[4]  {coupon:ID}:failed    SET   users whose last request was dead-lettered
-- ARGV[1]  coupon id
-- ARGV[2]  pub/sub channel told the coupon's id when this call takes the last stock slot
-- ARGV[3..] user ids, in arrival order
--
-- Returns a flat array:
--   [1] batch status: 0 = judged, 1 = no Redis state for this coupon (nothing judged)
--   [2] Redis server time in ms (the clock every window decision uses)
--   [3] remaining stock after this batch (-1 = unlimited)
--   then, per user in ARGV order: result code, request id ("" unless accepted)
-- Result codes: 0 accepted, 1 duplicate, 2 sold out, 3 not started, 4 ended, 5 paused.
--
-- The `#!lua` line makes Redis refuse the whole script up front when it is out of memory,
-- so a reservation is never half-written. All reads come before any write.

local meta = redis.call('HMGET', KEYS[1], 'total', 'start_ms', 'end_ms', 'paused')
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if not meta[2] then
    return {1, now_ms, 0}
end

local total = tonumber(meta[1])
local start_ms = tonumber(meta[2])
local end_ms = tonumber(meta[3])
local n = #ARGV - 2
local reply = {0, now_ms, 0}

local batch_code = nil
if meta[4] == '1' then
    batch_code = 5
elseif now_ms < start_ms then
    batch_code = 3
elseif now_ms >= end_ms then
    batch_code = 4
end

local reserved = redis.call('SCARD', KEYS[2])
if batch_code ~= nil then
    for _ = 1, n do
        reply[#reply + 1] = batch_code
        reply[#reply + 1] = ''
    end
    reply[3] = total < 0 and -1 or math.max(total - reserved, 0)
    return reply
end

local users = {}
for i = 1, n do
    users[i] = ARGV[i + 2]
end
local members = redis.call('SMISMEMBER', KEYS[2], unpack(users))

-- Decide every user before writing anything.
local seen = {}
local accepted = {}
local codes = {}
for i = 1, n do
    local user = users[i]
    if members[i] == 1 or seen[user] then
        codes[i] = 1
    elseif total >= 0 and reserved >= total then
        codes[i] = 2
    else
        codes[i] = 0
        reserved = reserved + 1
        accepted[#accepted + 1] = user
    end
    seen[user] = true
end

if #accepted > 0 then
    redis.call('SADD', KEYS[2], unpack(accepted))
    redis.call('SREM', KEYS[4], unpack(accepted))
end
local now_field = tostring(now_ms)
for i = 1, n do
    reply[#reply + 1] = codes[i]
    if codes[i] == 0 then
        reply[#reply + 1] = redis.call('XADD', KEYS[3], '*', 'c', ARGV[1], 'u', users[i], 't', now_field)
    else
        reply[#reply + 1] = ''
    end
end
reply[3] = total < 0 and -1 or math.max(total - reserved, 0)
if #accepted > 0 and reply[3] == 0 then
    redis.call('PUBLISH', ARGV[2], ARGV[1])
end
return reply
