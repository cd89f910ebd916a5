-- Incidents' shared pieces (detector/state/incidents.py), sent in front of incident_onsets.lua
-- and incident_sweep.lua as one script each.
--
-- KEYS (both scripts): [1] `current` (hash: the incident now open, absent when none: id,
-- first and last onset timestamp, series, onsets, opened and arrival = the Redis times it
-- opened and an onset last joined), [2] `members` (hash series → episode id, of the open
-- incident), [3] `last_members` (the same for the incident closed last: a redelivered onset
-- of it is not taken for a new one), [4] `pending` (sorted set series → onset timestamp:
-- onsets in no incident, within the window of the newest), [5] `pending_episodes` (hash
-- series → episode id, and the field ' arrival': the Redis time a pending onset was last
-- added), [6] `outbox` (hash source id → event as JSON, kept until the worker recorded it,
-- and on Kafka produced it), [7] `leases` (sorted set source id → when the worker's claim on
-- it runs out), [8] the anomalies stream (written to in 'xadd' mode only), [9] the watched
-- series (the silence watch's hash of every series seen on the stream: the fleet).
-- ARGV (both scripts): [1] the window in seconds, [2] the fewest series that make an
-- incident, [3] the mode ('xadd': the script writes the events to the stream; 'lease': the
-- caller produces them), [4] the stream's MAXLEN ~, [5] the lease in seconds, [6] the
-- smallest share of the fleet that makes an incident (the fewest series is the larger of
-- [2] and that share of the fleet's size), [7] the fleet's size, or -1: KEYS[9]'s size
-- (sharded streams: the shards' fleets are in other slots, so the caller sums them).

-- Redis' own clock: one clock for every worker.
local function now_seconds()
    if redis.replicate_commands then
        redis.replicate_commands()  -- Redis < 7: TIME before writes needs effects replication
    end
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1e6
end

local window, need, mode, maxlen, lease =
    tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5])
local share = tonumber(ARGV[6])
if share > 0 then
    local fleet = tonumber(ARGV[7])
    if fleet < 0 then
        fleet = redis.call('HLEN', KEYS[9])
    end
    need = math.max(need, math.ceil(share * fleet))
end
local ARRIVAL = ' arrival'  -- not a series id (they have no blanks)

-- redis.call(command, key, items...) in slices: Lua's unpack has a stack limit.
local function call_in_slices(command, key, items)
    for i = 1, #items, 1000 do
        redis.call(command, key, unpack(items, i, math.min(i + 999, #items)))
    end
end

local function load_current()
    local v = redis.call('HMGET', KEYS[1], 'id', 'first', 'last', 'series', 'onsets', 'opened',
        'arrival')
    if not v[1] then
        return nil
    end
    return {id = v[1], first = tonumber(v[2]), last = tonumber(v[3]), series = tonumber(v[4]),
            onsets = tonumber(v[5]), opened = tonumber(v[6]), arrival = tonumber(v[7])}
end

local function save_current(c)
    redis.call('HSET', KEYS[1], 'id', c.id, 'first', string.format('%d', c.first),
        'last', string.format('%d', c.last), 'series', string.format('%d', c.series),
        'onsets', string.format('%d', c.onsets), 'opened', string.format('%.6f', c.opened),
        'arrival', string.format('%.6f', c.arrival))
end

-- An incident's event as a flat field list; `closed` (a Redis time) and `by` for the closed one.
local function incident_event(c, now, closed, by)
    local event = {
        'type', 'incident',
        'state', closed and 'closed' or 'open',
        'incident_id', c.id,
        'source_id', closed and (c.id .. ':closed') or c.id,
        'series_count', string.format('%d', c.series),
        'onset_count', string.format('%d', c.onsets),
        'first_onset', string.format('%d', c.first),
        'last_onset', string.format('%d', c.last),
        'opened_at', string.format('%.6f', c.opened),
        'window_seconds', string.format('%d', window),
        'min_series', string.format('%d', need),
        'detected_at', string.format('%.6f', now),
    }
    if closed then
        event[#event + 1] = 'closed_at'
        event[#event + 1] = string.format('%.6f', closed)
        event[#event + 1] = 'closed_by'
        event[#event + 1] = by
    end
    return event
end

-- Write (in 'xadd' mode) an event and keep it in the outbox, leased to this caller; `out`
-- collects what the call returns.
local function emit(event, source_id, now, out)
    if mode == 'xadd' then
        redis.call('XADD', KEYS[8], 'MAXLEN', '~', maxlen, '*', unpack(event))
    end
    redis.call('HSET', KEYS[6], source_id, cjson.encode(event))
    redis.call('ZADD', KEYS[7], now + lease, source_id)
    out[#out + 1] = event
end

-- Close the open incident `c` (`by` says why): its closed event; its members become the last.
local function close_current(c, now, by, out)
    emit(incident_event(c, now, now, by), c.id .. ':closed', now, out)
    redis.call('DEL', KEYS[1], KEYS[3])
    if redis.call('EXISTS', KEYS[2]) == 1 then
        redis.call('RENAME', KEYS[2], KEYS[3])
    end
end

-- Close the open incident if no onset joined it for the window of arrival time (the stream
-- went quiet: no later onset will close it by event time), and forget pending onsets that
-- old. Returns the incident still open, or nil.
local function close_if_idle(c, now, out)
    if c and now - c.arrival > window then
        close_current(c, now, 'idle', out)
        c = nil
    end
    if not c then
        local added = redis.call('HGET', KEYS[5], ARRIVAL)
        if added and now - tonumber(added) > window then
            redis.call('DEL', KEYS[4], KEYS[5])
        end
    end
    return c
end
