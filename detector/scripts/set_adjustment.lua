-- A series' feedback adjustment, written only if it is newer than the one stored.
-- KEYS[1] feedback:{<series_id>}
-- ARGV[1] through: the newest feedback revision the adjustment was computed from
-- ARGV[2..] field, value pairs (the per-test scales)
-- Returns 1 if written, 0 if the stored one is as new or newer (a concurrent writer won).
local stored = redis.call('HGET', KEYS[1], 'through')
if stored and tonumber(stored) >= tonumber(ARGV[1]) then
    return 0
end
redis.call('HSET', KEYS[1], 'through', ARGV[1], unpack(ARGV, 2))
return 1
