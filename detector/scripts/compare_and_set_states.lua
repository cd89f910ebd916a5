-- Writes every state whose seq is unchanged (runs after state_common.lua). KEYS: the states;
-- ARGV: per key the seq read ("0" when absent) and the new state's bytes. Returns the
-- 1-based indexes of the keys left unwritten.
local conflicts = {}
for i, key in ipairs(KEYS) do
    local kind, seq = stored_seq(key)
    if seq == ARGV[2 * i - 1] then
        write_state(key, kind, seq, ARGV[2 * i])
    else
        conflicts[#conflicts + 1] = i
    end
end
return conflicts
