-- Only a consumer with nothing pending may be deleted: its pending entries would become
-- unclaimable (Redis never hands them to another consumer).
--
-- KEYS[1] the stream; ARGV[1] the group, ARGV[2] the consumer. Returns the number of pending
-- entries deleted with it (0), or -1 when it still has some and was kept.
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
    return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
