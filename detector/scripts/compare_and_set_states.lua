-- Writes every state whose seq is unchanged (runs after state_common.lua). KEYS: the states;
-- ARGV[1]: per key the seq read ("0" when absent) and the length in bytes of its new stored
-- form, as "<seq>,<length>;" one after another; ARGV[2]: the new stored forms ("<seq + 1>\n"
-- and the state's bytes, made by the client), end to end. (Two arguments, not two a key:
-- the client packs a command argument by argument, and a batch's thousands of them cost more
-- to pack than the script costs to run.) Returns the 1-based indexes of the keys left
-- unwritten.
local conflicts = {}
local values, at, i = ARGV[2], 1, 0
for seq, length in string.gmatch(ARGV[1], '(%d+),(%d+);') do
    i = i + 1
    local key = KEYS[i]
    local stop = at + tonumber(length)
    local kind, stored = stored_seq(key)
    if stored == seq then
        write_value(key, kind, string.sub(values, at, stop - 1))
    else
        conflicts[#conflicts + 1] = i
    end
    at = stop
end
if i ~= #KEYS or at ~= #values + 1 then
    return redis.error_reply('ERR compare_and_set_states: the layout does not match the keys')
end
return conflicts
