-- The `latest` field of each series' model hash, in one call (a pipeline of one HGET a series
-- costs the client a command to pack and a reply to parse each).
--
-- KEYS: `model:{<series_id>}` hashes. Returns one reply per key, in order: the version, or nil
-- for a key without it.
local out = {}
for i, key in ipairs(KEYS) do
    out[i] = redis.call('HGET', key, 'latest')
end
return out
