"""Every Lua script, each opening with its KEYS[] and ARGV[] contract.

A script only touches the keys it is given, all of one hash tag, so Redis Cluster works.
"""

from __future__ import annotations

# Writes a strategy's config and replaces its runtime, unless Redis already holds the same or a
# newer runtime version: two writers that race (Start and Stop, a retry, recovery) can never
# leave an older snapshot on top of a newer one.
# KEYS[1] strategy:{id}   KEYS[2] runtime:{id}
# ARGV[1] version of the incoming runtime
# ARGV[2] number N of strategy fields, then N field/value pairs, then the runtime field/value
#         pairs up to the end of ARGV
# Returns 1 when written, 0 when the stored version was already >= ARGV[1].
APPLY_RUNTIME = """
local incoming = tonumber(ARGV[1])
local stored = tonumber(redis.call('HGET', KEYS[2], 'version') or '-1')
if stored >= incoming then
  return 0
end
local n = tonumber(ARGV[2])
local i = 3
if n > 0 then
  local fields = {}
  for k = i, i + 2 * n - 1 do
    fields[#fields + 1] = ARGV[k]
  end
  redis.call('HSET', KEYS[1], unpack(fields))
end
i = i + 2 * n
local runtime = {}
for k = i, #ARGV do
  runtime[#runtime + 1] = ARGV[k]
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(runtime))
return 1
"""
