-- One call per batch assigns every anomalous reading of the batch to an episode.
--
-- KEYS: one `episode:{<series_id>}` hash per distinct series. ARGV[1]: the quiet period in
-- seconds of event time; ARGV[2]: how many closed episodes a series remembers; ARGV[3]: lines
-- "<key index> <timestamp> <source_id>" in batch order. Returns per reading the episode id and
-- a flag: "1" opened a new episode here, "2" the opener seen again (a redelivery), "3" a late
-- reading that matches no remembered episode (its own episode), "0" joined an episode.
--
-- The rule (in event time, q = the quiet period). A series has a current episode with the
-- opener's id and timestamp `first` and its latest anomaly `last`; its window is
-- [first − q, last + q]. A reading at t
--   - after the window (t > last + q) closes the current episode and opens a new one (onset);
--   - inside it joins the current episode (last = max(last, t); first never moves, so a
--     window's lower edge is fixed once opened);
--   - before it is late: it joins the newest remembered closed episode whose frozen window
--     holds t, or else it is an episode of its own (onset; not remembered).
-- Episode ids are the opener's `readings` entry id, and onset means "is the opener", so the
-- same reading always gets the same answer: windows only grow upward while current, are
-- frozen once closed, and every later episode starts above every reading assigned before it.
local quiet = tonumber(ARGV[1])
local keep = tonumber(ARGV[2])
local states = {}
local out = {}
for k, t, sid in string.gmatch(ARGV[3], '(%d+) (%d+) (%S+)') do
    local key = KEYS[tonumber(k)]
    local s = states[key]
    if s == nil then
        local v = redis.call('HMGET', key, 'id', 'first', 'last', 'hist')
        s = {id = v[1], first = tonumber(v[2]), last = tonumber(v[3]), lastraw = v[3],
             hist = v[4] or '', dirty = false}
        states[key] = s
    end
    local ts = tonumber(t)
    local eid, flag
    if not s.id then
        s.id, s.first, s.firstraw, s.last, s.lastraw, s.dirty = sid, ts, t, ts, t, true
        eid, flag = sid, '1'
    elseif ts > s.last + quiet then
        local closed = s.id .. ' ' .. string.format('%.0f', s.first - quiet) .. ' ' ..
            string.format('%.0f', s.last + quiet)
        local entries = {closed}
        for entry in string.gmatch(s.hist, '[^;]+') do
            if #entries >= keep then break end
            entries[#entries + 1] = entry
        end
        s.hist = keep > 0 and table.concat(entries, ';') or ''
        s.id, s.first, s.firstraw, s.last, s.lastraw, s.dirty = sid, ts, t, ts, t, true
        eid, flag = sid, '1'
    elseif ts >= s.first - quiet then
        if ts > s.last then
            s.last, s.lastraw, s.dirty = ts, t, true
        end
        eid = s.id
        flag = (sid == s.id) and '2' or '0'
    else
        for hid, lo, hi in string.gmatch(s.hist, '([^;%s]+) (%-?%d+) (%-?%d+)') do
            if ts >= tonumber(lo) and ts <= tonumber(hi) then
                eid = hid
                break
            end
        end
        if eid then
            flag = (sid == eid) and '2' or '0'
        else
            eid, flag = sid, '3'
        end
    end
    out[#out + 1] = eid
    out[#out + 1] = flag
end
for key, s in pairs(states) do
    if s.dirty then
        local fields = {'id', s.id, 'last', s.lastraw, 'hist', s.hist}
        if s.firstraw then
            fields[#fields + 1] = 'first'
            fields[#fields + 1] = s.firstraw
        end
        redis.call('HSET', key, unpack(fields))
    end
end
return out
