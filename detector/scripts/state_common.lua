-- The streaming state's stored form, sent in front of compare_and_set_states.lua and
-- flush_held.lua: one string "<seq>\n<state>" a series; one written as a hash of seq and data
-- (before states were strings) is read as well and replaced by the string, keeping its time
-- to live.

-- The key's type and the seq of the state it holds ('0' when absent). A string's head is
-- read at once (the common case: one call, not TYPE first); another type refuses GETRANGE.
local function stored_seq(key)
    local head = redis.pcall('GETRANGE', key, 0, 24)
    if type(head) == 'string' then
        return 'string', string.match(head, '^(%d+)\n') or '0'
    end
    local kind = redis.call('TYPE', key).ok
    if kind == 'hash' then
        return kind, redis.call('HGET', key, 'seq') or '0'
    end
    return kind, '0'
end

-- Write the stored form ``value`` ("<seq>\n<state>") over a state of type ``kind``.
local function write_value(key, kind, value)
    if kind == 'hash' then
        local ttl = redis.call('PTTL', key)
        redis.call('DEL', key)
        if ttl > 0 then
            redis.call('SET', key, value, 'PX', ttl)
        else
            redis.call('SET', key, value)
        end
    else
        redis.call('SET', key, value, 'KEEPTTL')
    end
end

-- Write the state with seq one past ``seq``.
local function write_state(key, kind, seq, state)
    write_value(key, kind, tostring(tonumber(seq) + 1) .. '\n' .. state)
end
