-- The streaming states of KEYS, each "<seq>\n<state>", false (nil) when absent. A state
-- written as a hash of seq and data (before states were strings) is answered in the same form.
local found = {}
for i, key in ipairs(KEYS) do
    local kind = redis.call('TYPE', key).ok
    if kind == 'string' then
        found[i] = redis.call('GET', key)
    elseif kind == 'hash' then
        local fields = redis.call('HMGET', key, 'seq', 'data')
        found[i] = (fields[1] or '0') .. '\n' .. (fields[2] or '')
    else
        found[i] = false
    end
end
return found
