-- One call per batch that has episode onsets: groups them into incidents (runs after
-- incident_common.lua, whose KEYS, ARGV and functions it uses). ARGV[8]: the onsets, lines
-- "<series_id> <timestamp> <episode_id>" in batch order.
--
-- The rule (event time, w = the window, n = the fewest series):
--   - while an incident is open, an onset at t joins it if first - w <= t <= last + w (first
--     and last move to take it in); one after last + w closes it (closed_by 'window') and is
--     then taken as below; one before first - w is too late for it and changes nothing;
--   - without an open incident, onsets wait in `pending` (per series its newest), which keeps
--     only those within w of the newest pending one, so all of them opened within w of each
--     other; once n distinct series are pending they open an incident together, its id
--     'incident:' .. the episode id of the onset that made the n-th series.
-- Before the onsets, the open incident is closed (closed_by 'idle') if none joined it for w
-- of arrival time, as the sweep does. An onset already taken (its series has the same episode
-- id in the open incident, the one closed last, or pending) changes nothing: a redelivered
-- batch neither opens nor counts anything twice.
-- Returns {incidents opened, 1 if one is open now, events written (flat field lists), the
-- open incident as an open event if this call joined or met it, else {}}.
local now = now_seconds()
local out, opened, touched, dirty = {}, 0, false, false
local c = close_if_idle(load_current(), now, out)
for series, ts, eid in string.gmatch(ARGV[8], '(%S+) (%d+) (%S+)') do
    local t = tonumber(ts)
    if c and t > c.last + window then
        if dirty then
            save_current(c)
        end
        close_current(c, now, 'window', out)
        c, dirty, touched = nil, false, false
    end
    if c then
        local had = redis.call('HGET', KEYS[2], series)
        if had == eid then
            touched = true
        elseif t >= c.first - window then
            if not had then
                c.series = c.series + 1
            end
            redis.call('HSET', KEYS[2], series, eid)
            c.onsets = c.onsets + 1
            c.first, c.last, c.arrival = math.min(c.first, t), math.max(c.last, t), now
            dirty, touched = true, true
        end
    elseif redis.call('HGET', KEYS[3], series) ~= eid
        and redis.call('HGET', KEYS[5], series) ~= eid then
        local old = redis.call('ZSCORE', KEYS[4], series)
        if not old or t >= tonumber(old) then
            redis.call('ZADD', KEYS[4], t, series)
            redis.call('HSET', KEYS[5], series, eid, ARRIVAL, string.format('%.6f', now))
        end
        local newest = tonumber(redis.call('ZREVRANGE', KEYS[4], 0, 0, 'WITHSCORES')[2])
        local stale = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. (newest - window))
        if #stale > 0 then
            call_in_slices('ZREM', KEYS[4], stale)
            call_in_slices('HDEL', KEYS[5], stale)
        end
        if redis.call('ZCARD', KEYS[4]) >= need then
            local all = redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES')
            c = {id = 'incident:' .. eid, first = tonumber(all[2]), last = tonumber(all[#all]),
                 series = #all / 2, onsets = #all / 2, opened = now, arrival = now}
            local members = {}
            for i = 1, #all, 2 do
                members[#members + 1] = all[i]
                members[#members + 1] = redis.call('HGET', KEYS[5], all[i])
            end
            redis.call('DEL', KEYS[2], KEYS[4], KEYS[5])
            call_in_slices('HSET', KEYS[2], members)
            save_current(c)
            emit(incident_event(c, now), c.id, now, out)
            opened = opened + 1
            dirty, touched = false, false
        end
    end
end
if c and dirty then
    save_current(c)
end
local state = {}
if c and touched then
    state = incident_event(c, now)
end
return {opened, c and 1 or 0, out, state}
