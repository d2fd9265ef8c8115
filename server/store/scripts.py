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

# Enqueues an order event once per intent: replicas whose timers all fire add one entry.
# KEYS[1] the queue stream (queue:orders or {queue:orders}:exits)   KEYS[2] the fired marker
# ARGV[1] marker lifetime in ms   ARGV[2..] the event's field/value pairs
# Returns the new entry id, or false when this intent was enqueued before.
ENQUEUE_ONCE = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  return false
end
local fields = {}
for k = 2, #ARGV do
  fields[#fields + 1] = ARGV[k]
end
return redis.call('XADD', KEYS[1], '*', unpack(fields))
"""

# Releases a lock only if we still hold it (our token), so a slow holder whose lock expired
# never deletes the next holder's lock.
# KEYS[1] lock_state:{id}   ARGV[1] our token
# Returns 1 when released, 0 when the lock was not ours (any more).
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Extends a lock we hold while a slow broker call runs.
# KEYS[1] lock_state:{id}   ARGV[1] our token   ARGV[2] new TTL in ms
# Returns 1 when extended, 0 when the lock is no longer ours.
EXTEND_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# The paper broker's place: the first order stored under a client order id wins, and every
# later place with that id gets the first one back (brokers that dedupe do this).
# KEYS[1] {paper}:orders   KEYS[2] {paper}:log
# ARGV[1] client order id   ARGV[2] the order as JSON
# Returns the stored order's JSON.
PAPER_PLACE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
end
return redis.call('HGET', KEYS[1], ARGV[1])
"""
