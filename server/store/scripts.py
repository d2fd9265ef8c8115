"""Every Lua script, each opening with its KEYS[] and ARGV[] contract.

A script only touches the keys it is given, all of one hash tag, so Redis Cluster works.
"""

from __future__ import annotations

# Writes a strategy's static config (when given: it never changes, so writing it again is
# harmless and restores it after a wipe) and replaces its runtime, unless Redis already holds
# the same or a newer runtime version: two writers that race (Start and Stop, a retry,
# recovery) can never leave an older snapshot on top of a newer one.
# KEYS[1] strategy:{id}   KEYS[2] runtime:{id}
# ARGV[1] version of the incoming runtime
# ARGV[2] number N of strategy fields, then N field/value pairs, then the runtime field/value
#         pairs up to the end of ARGV
# Returns 1 when the runtime was written, 0 when the stored version was already >= ARGV[1].
APPLY_RUNTIME = """
local n = tonumber(ARGV[2])
if n > 0 then
  local fields = {}
  for k = 3, 2 + 2 * n do
    fields[#fields + 1] = ARGV[k]
  end
  redis.call('HSET', KEYS[1], unpack(fields))
end
local stored = tonumber(redis.call('HGET', KEYS[2], 'version') or '-1')
if stored >= tonumber(ARGV[1]) then
  return 0
end
local i = 3 + 2 * n
local runtime = {}
for k = i, #ARGV do
  runtime[#runtime + 1] = ARGV[k]
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(runtime))
return 1
"""

# Enqueues an order event once per intent: replicas whose timers all fire add one entry.
# With a consumer named, it also takes the oldest entry of the stream no consumer has taken
# yet (normally the one just added) for that consumer, as XREADGROUP would: a stop-loss exit
# queued by the process that saw the tick runs there at once, without a worker's wake-up
# round trip, and the entry is pending in the group like any taken entry (reclaimed if the
# taker dies).
# KEYS[1] the queue stream (queue:orders or {queue:orders}:exits)   KEYS[2] the fired marker
# ARGV[1] marker lifetime in ms   ARGV[2] the consumer that takes an entry ('' = none)
# ARGV[3] the consumer group   ARGV[4..] the event's field/value pairs
# Returns false when this intent was enqueued before. Otherwise, without a consumer, the new
# entry's id; with one, XREADGROUP's reply (1 when it took nothing or failed: the entry then
# waits for the workers).
ENQUEUE_ONCE = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  return false
end
local fields = {}
for k = 4, #ARGV do
  fields[#fields + 1] = ARGV[k]
end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
if ARGV[2] == '' then
  return id
end
local taken = redis.pcall(
  'XREADGROUP', 'GROUP', ARGV[3], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
if type(taken) ~= 'table' or taken['err'] then
  return 1
end
return taken
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

# Stores a tick's price and takes every armed stop-loss it breaches (stop_loss >= price) out of
# the armed set into the fired hash, in one step: O(log n + triggered), and a strategy fires
# once. With an empty ARGV[1] it re-checks the stored price (used right after arming, so a
# tick that came while the BUY was in flight is not lost).
# KEYS[1] price:{SYMBOL}   KEYS[2] symbol:{SYMBOL}:stoploss   KEYS[3] symbol:{SYMBOL}:stoploss:fired
# KEYS[4] symbol:{SYMBOL}:stoploss:runs
# ARGV[1] the new price as a plain decimal string ('' = use the stored one)
# ARGV[2] the lowest price of the batch ending at ARGV[1] ('' or absent: ARGV[1] alone)
# ARGV[3..6], when given: a position to arm first (arm and recheck in one step): the member,
#         its score, the strategy id and its '<run> <tenant>'
# Returns, flat, each fired strategy's id and its '<run> <tenant>' ('' when its position was
# armed without one: the caller reads the runtime instead).
STOPLOSS_TRIGGER = """
if ARGV[3] and ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
  redis.call('HSET', KEYS[4], ARGV[5], ARGV[6])
end
local price = ARGV[1]
if price == '' then
  price = redis.call('GET', KEYS[1])
  if not price then
    return {}
  end
else
  redis.call('SET', KEYS[1], price)
end
-- ARGV[2], when given, is the lowest price of a batch of ticks whose last is ARGV[1]: the
-- batch breached every stop-loss at or above its lowest price.
if ARGV[2] and ARGV[2] ~= '' then
  price = ARGV[2]
end
local int, frac = string.match(price, '^(%d+)%.?(%d*)$')
if not int or #int > 10 or #frac > 8 then
  return redis.error_reply('bad price ' .. price)
end
local padded = string.rep('0', 10 - #int) .. int .. '.' .. frac .. string.rep('0', 8 - #frac)
-- Scores are doubles: take a slightly wider range, then compare the exact padded decimals.
local low = tonumber(price) * (1 - 1e-12)
local fired = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], low, '+inf')) do
  if string.sub(member, 1, 19) >= padded then
    local id = string.sub(member, 21)
    redis.call('ZREM', KEYS[2], member)
    redis.call('HSET', KEYS[3], id, price)
    fired[#fired + 1] = id
    fired[#fired + 1] = redis.call('HGET', KEYS[4], id) or ''
    redis.call('HDEL', KEYS[4], id)
  end
end
return fired
"""
