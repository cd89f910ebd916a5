-- The periodic sweep of every worker (runs after incident_common.lua, whose KEYS, ARGV and
-- functions it uses; ARGV[8]: at most this many expired leases a call). Closes the open
-- incident once no onset joined it for the window of arrival time (whichever worker sweeps
-- first writes its one closed event), and hands back the events whose lease ran out (the
-- worker that had them died before recording them, or on Kafka producing them), leased again
-- to this caller; in 'xadd' mode they are not written again (the stream has them).
-- Returns {1 if an incident is open now, events to record (flat field lists)}.
local now = now_seconds()
local out = {}
local c = close_if_idle(load_current(), now, out)
local due = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now, 'LIMIT', 0, tonumber(ARGV[8]))
for _, source_id in ipairs(due) do
    local raw = redis.call('HGET', KEYS[6], source_id)
    if raw then
        redis.call('ZADD', KEYS[7], now + lease, source_id)
        out[#out + 1] = cjson.decode(raw)
    else
        redis.call('ZREM', KEYS[7], source_id)
    end
end
return {c and 1 or 0, out}
