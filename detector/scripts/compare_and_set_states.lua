-- Writes every state whose seq is unchanged. KEYS: the states; ARGV: per key the seq read
-- ("0" when absent) and the new JSON. Returns the 1-based indexes of the keys left unwritten.
local conflicts = {}
for i, key in ipairs(KEYS) do
    local seq = redis.call('HGET', key, 'seq') or '0'
    if seq == ARGV[2 * i - 1] then
        redis.call('HSET', key, 'seq', tostring(tonumber(seq) + 1), 'data', ARGV[2 * i])
    else
        conflicts[#conflicts + 1] = i
    end
end
return conflicts
