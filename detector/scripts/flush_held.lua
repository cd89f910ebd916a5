-- Folds the held readings of series that stopped reporting (detector/state/lateness.py; runs
-- after state_common.lua):
-- writes each new state, its events and its removal from the held set at once, so a flush
-- is written whole or not at all, whichever worker sweeps.
--
-- KEYS[1] the held set (`state:held`), KEYS[2] `anomalies`, KEYS[3..] the series' states.
-- ARGV[1] the MAXLEN ~ of anomalies; ARGV[2] JSON [[seq, series_id, [[field, value, ...],
-- ...]], ...], one per state key; ARGV[3..] the new states' bytes, in the same order. A
-- state whose seq changed since it was read (a reading of the series arrived meanwhile) is
-- left, with its events unwritten: the next batch or sweep takes care of it. Returns the 1-based indexes of the
-- states written.
local todo = cjson.decode(ARGV[2])
local written = {}
for i, item in ipairs(todo) do
    local key = KEYS[i + 2]
    local kind, seq = stored_seq(key)
    if seq == item[1] then
        write_state(key, kind, seq, ARGV[i + 2])
        for _, fields in ipairs(item[3]) do
            redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
        end
        redis.call('ZREM', KEYS[1], item[2])
        written[#written + 1] = i
    end
end
return written
