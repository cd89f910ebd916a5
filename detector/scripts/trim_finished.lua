-- Trims a stream below the oldest entry any of its groups still needs: its oldest pending
-- entry, or else the one after its last-delivered id. LIMIT 0 lifts the cap a `~` trim has by
-- default (100 macro nodes, 10,000 entries a call), which a worker trimming every few seconds
-- cannot keep up with above a few thousand readings/s. `~` frees whole macro nodes only, so
-- up to one node of finished entries stays. Returns the MINID used, or false.
--
-- Defines trim_finished(stream) for the script it is prepended to (commit_batch.lua, or a
-- one-line "return trim_finished(KEYS[1])" for a trim alone).
local function trim_finished(stream)
    if redis.call('EXISTS', stream) == 0 then
        return false
    end
    local bound_ms, bound_seq, bound = nil, nil, nil
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
        local info = {}
        for i = 1, #g, 2 do
            info[g[i]] = g[i + 1]
        end
        local pending = redis.call('XPENDING', stream, info['name'])
        local id, step = info['last-delivered-id'], 1
        if pending[1] > 0 then
            id, step = pending[2], 0
        end
        local ms, seq = string.match(id, '^(%d+)-(%d+)$')
        ms, seq = tonumber(ms), tonumber(seq)
        if seq + step >= 2^53 then
            step = 0  -- past exact doubles: trim below the id itself (keeps one more)
        end
        seq = seq + step
        if bound_ms == nil or ms < bound_ms or (ms == bound_ms and seq < bound_seq) then
            bound_ms, bound_seq = ms, seq
            bound = string.match(id, '^(%d+)-') .. '-' .. string.format('%d', seq)
        end
    end
    if bound == nil or (bound_ms == 0 and bound_seq <= 1) then
        return false
    end
    redis.call('XTRIM', stream, 'MINID', '~', bound, 'LIMIT', 0)
    return bound
end
