-- Entries not yet delivered to the group: the stream's length minus the entries up to the
-- group's last-delivered id (Redis 6.2 has no `lag` in XINFO GROUPS). `readings` is trimmed
-- below the oldest pending entry, so the counted range stays small.
--
-- KEYS[1] the stream; ARGV[1] the group's last-delivered id, ARGV[2] the most entries to count.
-- Returns the number of entries not yet delivered.
local delivered = #redis.call('XRANGE', KEYS[1], '-', ARGV[1], 'COUNT', ARGV[2])
return redis.call('XLEN', KEYS[1]) - delivered
