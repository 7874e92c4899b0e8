#!lua
-- A stream worker says it is alive: its member of the workers ZSET, scored with Redis time.
--
-- KEYS[1]  coupons:workers  ZSET  member = worker name, score = last heartbeat (Redis ms)
-- ARGV[1]  worker name
-- ARGV[2]  keep: members silent for longer than this many ms are removed
--
-- Returns the Redis server time in ms written as the score. Scored on Redis's clock, never the
-- worker's, so a reader compares every heartbeat with one clock (its own TIME).

local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now_ms - tonumber(ARGV[2])))
return now_ms
