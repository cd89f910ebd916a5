-- Commits a batch atomically. ARGV[4] is the batch's entry ids (space-separated), ARGV[5] the
-- outputs of the entries that have one, as JSON [[id, kind, [field, value, ...]], ...] in entry
-- order; kind 'a' an anomaly event, 'n' a no_data event (both to `anomalies`, counted apart),
-- 'd' a dead letter; an entry may have several. For each entry still pending in the group (whoever owns it) its output is written, then
-- it is acknowledged. An entry no longer pending was finished by another consumer that had
-- claimed it: it is skipped, so no event is ever written twice. Outputs are written before the
-- XACKs: if a write fails, nothing is acknowledged and the entries are delivered again
-- (at-least-once) rather than lost.
--
-- Pending-ness matters only for the entries with an output (an XACK of an entry no longer
-- pending does nothing, and its reply counts only the entries it acknowledged): each is checked
-- on its own, or, past 64 outputs, first with one XPENDING range over the batch (ARGV[6]..
-- ARGV[7]) whose gaps are then checked on their own, so the answer never depends on the range.
-- The XACKs go 1000 ids a call. Then `readings` is trimmed below what the groups still need:
-- after every batch, so finished entries never pile up between the worker's periodic trims.
-- (Runs after trim_finished.lua, whose function it calls: the two are sent as one script.)
--
-- KEYS[1] `readings`, KEYS[2] `anomalies`, KEYS[3] `readings:dead`. ARGV[1] the group,
-- ARGV[2] and ARGV[3] the MAXLEN ~ of anomalies and dead letters, ARGV[4] the entry ids,
-- ARGV[5] the outputs, ARGV[6] and ARGV[7] the lowest and highest entry id of the batch.
-- Returns {entries acknowledged, anomaly events written, no_data events written}.
local group = ARGV[1]
local ids = {}
for id in string.gmatch(ARGV[4], '%S+') do
    ids[#ids + 1] = id
end
local outputs = cjson.decode(ARGV[5])
local live = {}
if #outputs > 64 then
    for _, p in ipairs(redis.call('XPENDING', KEYS[1], group, ARGV[6], ARGV[7], #ids * 2 + 16)) do
        live[p[1]] = true
    end
end
local emitted, noticed = 0, 0
for _, out in ipairs(outputs) do
    local id = out[1]
    if live[id] == nil then
        live[id] = #redis.call('XPENDING', KEYS[1], group, id, id, 1) > 0
    end
    if live[id] then
        if out[2] == 'a' then
            redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(out[3]))
            emitted = emitted + 1
        elseif out[2] == 'n' then
            redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(out[3]))
            noticed = noticed + 1
        elseif out[2] == 'd' then
            redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', unpack(out[3]))
        end
    end
end
local acked = 0
for i = 1, #ids, 1000 do
    acked = acked + redis.call('XACK', KEYS[1], group, unpack(ids, i, math.min(i + 999, #ids)))
end
trim_finished(KEYS[1])
return {acked, emitted, noticed}
