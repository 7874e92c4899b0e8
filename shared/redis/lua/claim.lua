#!lua
-- Claim again, for one consumer, the pending entries that are still the requests it holds.
--
-- KEYS[1]  {coupon:ID}:requests  STREAM
-- ARGV[1]  consumer group
-- ARGV[2]  consumer name
-- ARGV[3..] pairs: entry id, user id (as the worker read the entry)
--
-- Returns the ids claimed. An id is claimed only if the stream still holds an entry of that
-- id for that user and it is pending: after a Redis failover the new primary may have given
-- the same id (ids are time-based) to another user's request, or never seen the entry at all;
-- the worker must write a row for neither. The claim (XCLAIM JUSTID: no delivery counted)
-- is a write, so a WAIT after this call confirms the replicas hold every entry it returns.

local claimed = {}
for i = 3, #ARGV, 2 do
    local id, user = ARGV[i], ARGV[i + 1]
    local entry = redis.call('XRANGE', KEYS[1], id, id)
    local same = false
    if #entry == 1 then
        local fields = entry[1][2]
        for f = 1, #fields, 2 do
            if fields[f] == 'u' then
                same = fields[f + 1] == user
            end
        end
    end
    if same then
        local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
        if #got == 1 then
            claimed[#claimed + 1] = id
        end
    end
end
return claimed
