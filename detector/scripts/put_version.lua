-- KEYS[1] the series' model hash; ARGV[1] version, ARGV[2] its Redis form, ARGV[3] '1' to
-- move `latest` (forward only: fits that commit out of order, or a reload from PostgreSQL
-- racing a fit, can never move the pointer back). Returns 1. Safe to repeat.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local current = tonumber(redis.call('HGET', KEYS[1], 'latest') or '0')
if ARGV[3] == '1' and tonumber(ARGV[1]) > current then
    redis.call('HSET', KEYS[1], 'latest', ARGV[1])
end
return 1
