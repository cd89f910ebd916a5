-- The silent-series watch's shared pieces (detector/state/silence.py), sent in front of
-- observe_silence.lua and claim_silent.lua as one script each.
--
-- A series' record in the `series` hash is "version cadence from_fit last_timestamp arrival":
-- the model version last seen, its cadence in seconds (0: unknown yet), 1 when the cadence is
-- the fit's (else the observed spacing of streamed readings), the newest reading timestamp and
-- the Redis time its last batch arrived. A silent series' entry in the `silent` hash is JSON
-- {id, t, a, c, h, v}: the silence id, last timestamp, last arrival, cadence, threshold and
-- version, as the open event stated them.

-- Redis' own clock, so every worker measures silence against the same time.
local function now_seconds()
    if redis.replicate_commands then
        redis.replicate_commands()  -- Redis < 7: TIME before writes needs effects replication
    end
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1e6
end

local function parse_record(raw)
    local v, c, f, t, a = string.match(raw, '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
    return tonumber(v), tonumber(c), tonumber(f), tonumber(t), tonumber(a)
end

local function threshold_of(cadence, cadences, floor)
    return math.max(floor, cadences * cadence)
end

-- Seconds as the events write them: three decimals.
local function secs(x)
    return string.format('%.3f', x)
end

local function open_event(series, info, now)
    return {
        'series_id', series,
        'type', 'no_data',
        'state', 'open',
        'timestamp', string.format('%d', info.t),
        'model_version', string.format('v%d.0.0', info.v),
        'last_seen_at', secs(info.a),
        'silent_seconds', secs(now - info.a),
        'threshold_seconds', secs(info.h),
        'cadence_seconds', string.format('%.6g', info.c),
        'source_id', info.id,
        'silence_id', info.id,
        'detected_at', string.format('%.6f', now),
    }
end

local function closed_event(series, info, now, resumed_timestamp, resumed_source)
    return {
        'series_id', series,
        'type', 'no_data',
        'state', 'closed',
        'timestamp', string.format('%d', info.t),
        'model_version', string.format('v%d.0.0', info.v),
        'last_seen_at', secs(info.a),
        'silent_seconds', secs(now - info.a),
        'threshold_seconds', secs(info.h),
        'cadence_seconds', string.format('%.6g', info.c),
        'source_id', info.id .. ':closed',
        'silence_id', info.id,
        'detected_at', string.format('%.6f', now),
        'resumed_timestamp', string.format('%d', resumed_timestamp),
        'resumed_source_id', resumed_source,
    }
end
