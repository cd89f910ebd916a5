-- Writes every state whose seq is unchanged. KEYS: the states; ARGV: per key the seq read
-- ("0" when absent) and the new state's bytes. A state is one string, "<seq>\n<state>"; one
-- written as a hash of seq and data (before states were strings) is replaced by one, keeping
-- its time to live. Returns the 1-based indexes of the keys left unwritten.
local conflicts = {}
for i, key in ipairs(KEYS) do
    local kind = redis.call('TYPE', key).ok
    local seq = '0'
    if kind == 'string' then
        seq = string.match(redis.call('GETRANGE', key, 0, 24), '^(%d+)\n') or '0'
    elseif kind == 'hash' then
        seq = redis.call('HGET', key, 'seq') or '0'
    end
    if seq == ARGV[2 * i - 1] then
        local value = tostring(tonumber(seq) + 1) .. '\n' .. ARGV[2 * i]
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
    else
        conflicts[#conflicts + 1] = i
    end
end
return conflicts
