#!lua flags=no-writes
-- Where one coupon's accepted requests stand, read at one moment (invariant I5: every
-- accepted request is exactly one of issued, pending or dead-lettered). One call reads every
-- term, so no settlement can fall between two of the reads: a worker's acknowledgement (SADD
-- :issued and XACK in one MULTI), a dead letter (release.lua), a reservation (issue.lua).
-- Read-only (no-writes): it also runs while Redis is out of memory.
--
-- KEYS[1]  {coupon:ID}:requests    STREAM accepted requests, read by the group ARGV[1]
-- KEYS[2]  {coupon:ID}:issued      SET    users whose request was acknowledged as issued
-- KEYS[3]  {coupon:ID}:dead        STREAM dead letters
-- KEYS[4]  {coupon:ID}:correction  STRING integer: requests the stream's own sum cannot place
-- ARGV[1]  consumer group
--
-- Returns {accepted, lag, pending, issued, dead, correction}: accepted is the stream's
-- entries-added (-1 when Redis does not count it: before 7.0), lag the entries not yet
-- delivered (-1 when Redis cannot tell, after entries were deleted from the stream), pending
-- the entries delivered and not acknowledged.

local function field(flat, name)
    for i = 1, #flat, 2 do
        if flat[i] == name then
            return flat[i + 1]
        end
    end
    return false
end

local accepted, lag, pending = 0, 0, 0
if redis.call('EXISTS', KEYS[1]) == 1 then
    local added = field(redis.call('XINFO', 'STREAM', KEYS[1]), 'entries-added')
    accepted = added and tonumber(added) or -1
    local group = false
    for _, info in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
        if field(info, 'name') == ARGV[1] then
            group = info
        end
    end
    if group then
        local behind = field(group, 'lag')
        lag = behind and tonumber(behind) or -1
        pending = tonumber(field(group, 'pending'))
    else
        lag = redis.call('XLEN', KEYS[1])  -- no group yet: nothing was ever delivered
    end
end
local correction = tonumber(redis.call('GET', KEYS[4]) or '0') or 0
return {
    accepted, lag, pending, redis.call('SCARD', KEYS[2]), redis.call('XLEN', KEYS[3]), correction,
}
