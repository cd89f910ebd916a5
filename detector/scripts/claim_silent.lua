-- Claims the series whose deadline has passed, atomically, so however many workers sweep,
-- each silence is claimed once (runs after silence_events.lua, whose functions it calls).
--
-- KEYS[1] `deadlines`, KEYS[2] `series`, KEYS[3] `silent`, KEYS[4] the output: the anomalies
-- stream (ARGV[3] = 'xadd') or the `leases` sorted set (ARGV[3] = 'lease').
-- ARGV[1] at most this many series per call, ARGV[2] cadences, ARGV[3] the mode, ARGV[4] the
-- stream's MAXLEN ~ ('xadd') or the lease in seconds ('lease'), ARGV[5] the floor in seconds.
--
-- Each overdue series leaves `deadlines` and enters `silent`. 'xadd' writes its open event to
-- the stream here. 'lease' returns the events for the caller to produce (Kafka) and leases
-- them: the caller removes the lease once the broker acknowledged them; a lease that runs out
-- (the caller died between this call and its acknowledgement) is claimed again by the next
-- sweep, with the same source id. Returns {claimed, overdue seen, silent now, events}.
local limit, cadences, mode, floor = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[5])
local now = now_seconds()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local claimed, events = 0, {}
for _, series in ipairs(due) do
    redis.call('ZREM', KEYS[1], series)
    local raw = redis.call('HGET', KEYS[2], series)
    if raw and redis.call('HEXISTS', KEYS[3], series) == 0 then
        local v, c, _, t, a = parse_record(raw)
        local info = {
            id = string.format('no_data:%s:%d', series, math.floor(a * 1000)),
            t = t, a = a, c = c, h = threshold_of(c, cadences, floor), v = v,
        }
        redis.call('HSET', KEYS[3], series, cjson.encode(info))
        local event = open_event(series, info, now)
        if mode == 'xadd' then
            redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', unpack(event))
        else
            redis.call('ZADD', KEYS[4], now + tonumber(ARGV[4]), series)
            events[#events + 1] = event
        end
        claimed = claimed + 1
    end
end
if mode == 'lease' then
    for _, series in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, limit)) do
        local silent = redis.call('HGET', KEYS[3], series)
        if silent then
            redis.call('ZADD', KEYS[4], now + tonumber(ARGV[4]), series)
            events[#events + 1] = open_event(series, cjson.decode(silent), now)
        else
            redis.call('ZREM', KEYS[4], series)
        end
    end
end
return {claimed, #due, redis.call('HLEN', KEYS[3]), events}
