-- Versions of many series' models, in one call (a pipeline of one HGET a version costs the
-- client a command to build and a reply to parse each).
--
-- KEYS: `model:{<series_id>}` hashes; ARGV[i]: the version (field) wanted of KEYS[i]. Returns
-- one reply per key, in order: the version's stored form, or nil when the hash lacks it.
local out = {}
for i, key in ipairs(KEYS) do
    out[i] = redis.call('HGET', key, ARGV[i])
end
return out
