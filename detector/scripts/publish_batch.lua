-- Appends one numbered batch of a producer's readings to a stream, at most once.
--
-- KEYS[1]  the stream (`readings`)
-- KEYS[2]  the producer's record: "<batch number> <reading count> <entry id> ...", the last
--          batch it applied (in the stream's Redis Cluster slot: `{readings}:producer:<id>`)
-- ARGV[1]  the batch number (a producer numbers its batches 1, 2, 3 ...)
-- ARGV[2]  seconds the record is kept (a retry later than that would add the batch again)
-- ARGV[3]  MAXLEN ~ applied by each XADD
-- ARGV[4]  the number of readings in the batch
-- ARGV[5…] per reading: its number of field/value pairs n, then the 2n fields and values
--
-- Returns {1, id, ...} with the new entry ids when the batch was added now, or {0, id, ...}
-- with the ids it was given then when this batch number was the last one applied (a retry
-- after a lost reply). A batch number below the last one applied, or the same number with
-- another reading count, is an error: two publishers share the producer id.
local batch = tonumber(ARGV[1])
local count = tonumber(ARGV[4])
local record = redis.call('GET', KEYS[2])
if record then
    local last, last_count, ids = string.match(record, '^(%d+) (%d+) ?(.*)$')
    last, last_count = tonumber(last), tonumber(last_count)
    if batch == last and count == last_count then
        -- The record's life starts again, as if the batch were applied now. It is also a
        -- write: a WAIT after this call (REDIS_WAIT_REPLICAS) waits for the replicas to reach
        -- it, and so for the batch applied earlier, on whatever connection that was.
        redis.call('EXPIRE', KEYS[2], ARGV[2])
        local reply = {0}
        for id in string.gmatch(ids, '%S+') do
            reply[#reply + 1] = id
        end
        return reply
    end
    if batch <= last then
        return redis.error_reply('ERR batch ' .. batch .. ' is not after batch ' .. last ..
            ', the last one applied for this producer id: is it shared by two publishers?')
    end
end
local reply = {1}
local i = 5
for _ = 1, count do
    local pairs_n = tonumber(ARGV[i])
    reply[#reply + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*',
        unpack(ARGV, i + 1, i + 2 * pairs_n))
    i = i + 1 + 2 * pairs_n
end
redis.call('SET', KEYS[2], batch .. ' ' .. count .. ' ' .. table.concat(reply, ' ', 2),
    'EX', ARGV[2])
return reply
