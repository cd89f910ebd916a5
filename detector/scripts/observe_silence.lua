-- Records that a batch's fitted series reported, and closes the silence of those that were
-- silent (runs after silence_events.lua, whose functions it calls).
--
-- KEYS[1] `deadlines` (sorted set, score = the Redis time by which the series must report),
-- KEYS[2] `series` (records), KEYS[3] `silent`, KEYS[4] `resumed` (per series that was silent:
-- JSON [source id of the reading that ended it, its closed event]), KEYS[5] `leases`.
-- ARGV[1] cadences (the threshold's multiplier), ARGV[2] the floor in seconds, ARGV[3] the
-- batch's series as JSON [[series, version, first timestamp, lowest, highest, readings,
-- first source id, fit cadence], ...]; fit cadence 0 = the caller has not looked it up,
-- -1 = the version stored none, else seconds.
--
-- A series whose record is missing or names another version, sent with fit cadence 0, is
-- left untouched and returned in `need`: the caller looks up the fit's cadence and sends it
-- again. The cadence is the fit's when known, else the observed spacing of streamed readings
-- (smoothed); without one the series gets no deadline yet. A series that was silent is
-- closed: its closed event is returned and kept in `resumed`, so a redelivered closing
-- reading (the batch was not committed) yields the same event again.
-- Returns {need, closed events as flat field lists}.
local cadences, floor = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_seconds()
local need, closed = {}, {}
for _, item in ipairs(cjson.decode(ARGV[3])) do
    local series, version, first, low, high, n, source, fit =
        item[1], item[2], item[3], item[4], item[5], item[6], item[7], item[8]
    local raw = redis.call('HGET', KEYS[2], series)
    local rv, rc, rf, rt, ra
    if raw then
        rv, rc, rf, rt, ra = parse_record(raw)
    end
    if (not raw or rv ~= version) and fit == 0 then
        need[#need + 1] = series
    else
        local cadence, from_fit = 0, 0
        if fit > 0 then
            cadence, from_fit = fit, 1
        elseif raw and rv == version and rf == 1 then
            cadence, from_fit = rc, 1
        else
            local observed = 0
            if raw and high > rt then
                observed = (high - rt) / n
            elseif n > 1 and high > low then
                observed = (high - low) / (n - 1)
            end
            local old = (raw and rf == 0) and rc or 0
            if observed > 0 and old > 0 then
                cadence = 0.8 * old + 0.2 * observed
            elseif observed > 0 then
                cadence = observed
            else
                cadence = old
            end
        end
        local last = high
        if raw and rt > last then
            last = rt
        end
        redis.call('HSET', KEYS[2], series,
            string.format('%d %.6g %d %d %.3f', version, cadence, from_fit, last, now))
        if cadence > 0 and cadences > 0 then
            redis.call('ZADD', KEYS[1], now + threshold_of(cadence, cadences, floor), series)
        else
            redis.call('ZREM', KEYS[1], series)
        end
        local silent = redis.call('HGET', KEYS[3], series)
        if silent then
            redis.call('HDEL', KEYS[3], series)
            redis.call('ZREM', KEYS[5], series)
            local event = closed_event(series, cjson.decode(silent), now, first, source)
            redis.call('HSET', KEYS[4], series, cjson.encode({source, event}))
            closed[#closed + 1] = event
        else
            local again = redis.call('HGET', KEYS[4], series)
            if again then
                local kept = cjson.decode(again)
                if kept[1] == source then
                    closed[#closed + 1] = kept[2]
                end
            end
        end
    end
end
return {need, closed}
