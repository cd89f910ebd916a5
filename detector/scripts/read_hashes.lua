-- The same fields of many hashes, in one call (a pipeline of one HMGET a hash costs the
-- client a command to build and a reply to parse each).
--
-- KEYS: the hashes; ARGV: the fields wanted of each. Returns one reply per key, in order:
-- the fields' values (nil for a missing field), or nil when the key does not exist (the
-- common case of a sparse kind of hash, answered without building a row).
local out = {}
for i, key in ipairs(KEYS) do
    if redis.call('EXISTS', key) == 1 then
        out[i] = redis.call('HMGET', key, unpack(ARGV))
    else
        out[i] = false
    end
end
return out
