#!lua
-- Dead-letter one pending request and give its stock slot back.
--
-- KEYS[1]  {coupon:ID}:users     SET    users holding a stock slot
-- KEYS[2]  {coupon:ID}:requests  STREAM the request's stream
-- KEYS[3]  {coupon:ID}:dead      STREAM dead letters
-- KEYS[4]  {coupon:ID}:failed    SET    users whose last request was dead-lettered
-- ARGV[1]  consumer group
-- ARGV[2]  entry id
-- ARGV[3]  user id, or "" when the entry is too malformed to name one
-- ARGV[4]  reason (short snake_case text)
-- ARGV[5]  delivery count
-- ARGV[6]  pub/sub channel that gateways listen on for stock changes
-- ARGV[7]  coupon id (the message published)
--
-- Returns 1 when the entry was dead-lettered, 0 when it was no longer pending (another worker
-- resolved it first), so two workers racing on one entry release its slot once.

local pending = redis.call('XPENDING', KEYS[2], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then
    return 0
end
local original = redis.call('XRANGE', KEYS[2], ARGV[2], ARGV[2])

local fields = {'source_id', ARGV[2], 'reason', ARGV[4], 'deliveries', ARGV[5]}
if #original == 1 then
    local kv = original[1][2]
    for i = 1, #kv, 2 do
        fields[#fields + 1] = 'f_' .. kv[i]
        fields[#fields + 1] = kv[i + 1]
    end
end
redis.call('XADD', KEYS[3], '*', unpack(fields))
if ARGV[3] ~= '' then
    redis.call('SREM', KEYS[1], ARGV[3])
    redis.call('SADD', KEYS[4], ARGV[3])
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 1
