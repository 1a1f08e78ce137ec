"""The Lua scripts of the Redis queue (:mod:`eagle3_client.streaming.redis_queue`): one per operation.

Each operation that reads or changes several keys is one script, which Redis runs atomically,
so producers and trainers on any host see one order of events. Every script gets the run's
keys in :data:`KEYS` order and answers a list whose first element says what happened
(``"ok"``, ``"new"``, ``"unknown_run"``, ``"not_held"``, ...); the Python side turns refusals
into the contract's errors.

The run's stream holds one entry per sample that is pending or leased: a consumer group
(:data:`GROUP`) delivers the oldest undelivered entry (``XREADGROUP ... >``), which stays in
the group's pending-entries list while leased. ``ack`` acknowledges and deletes it; ``fail``
and an expired lease (found by ``XAUTOCLAIM`` with the run's visibility timeout as min-idle)
acknowledge and delete it and append a fresh entry, so the sample is pending again at the
tail, exactly as on an appliance. A lease id is ``<entry id>:<delivery number>``: each
delivery has its own entry, so an ack under an older delivery's lease is refused.
"""

from __future__ import annotations

__all__ = ["ACK", "ACQUIRE", "FAIL", "GROUP", "KEYS", "OPEN", "PUT", "RECLAIM", "SAMPLES", "SEAL"]

GROUP = "consumers"
# The run's keys, after its prefix ``eagle3:stream:<run>:``, in the order every script takes them.
KEYS = ("run", "queue", "refs", "uris", "states", "deliveries", "leases", "entries", "ids")

_PRELUDE = f"""
local run, q, refs, uris, states = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local deliveries, leases, entries, ids = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local GROUP = '{GROUP}'

local function closed()
  local sealed, total, acked = unpack(redis.call('HMGET', run, 'sealed', 'total', 'acked'))
  return sealed == '1' and tonumber(total) == tonumber(acked)
end

local function drop_entry(sample)
  local entry = redis.call('HGET', entries, sample)
  if entry then
    redis.call('XACK', q, GROUP, entry)
    redis.call('XDEL', q, entry)
    redis.call('HDEL', entries, sample)
  end
end

-- a leased sample goes back to pending, at the stream's tail
local function requeue(sample)
  drop_entry(sample)
  redis.call('HSET', entries, sample, redis.call('XADD', q, '*', 'sample', sample))
  redis.call('HSET', states, sample, 'pending')
  redis.call('HSET', leases, sample, '')
  redis.call('HINCRBY', run, 'leased', -1)
  redis.call('HINCRBY', run, 'pending', 1)
  redis.call('HINCRBY', run, 'redelivered', 1)
end

-- every lease idle for the visibility timeout goes back to pending; how many
local function reclaim()
  local idle = tonumber(redis.call('HGET', run, 'timeout_ms'))
  local n, cursor = 0, '0-0'
  repeat
    local got = redis.call('XAUTOCLAIM', q, GROUP, 'reclaimer', idle, cursor, 'COUNT', 100)
    cursor = got[1]
    for _, entry in ipairs(got[2]) do
      local id, fields = entry[1], entry[2]
      local sample = fields and fields[2]
      if sample and redis.call('HGET', entries, sample) == id and redis.call('HGET', states, sample) == 'leased' then
        requeue(sample)
        n = n + 1
      else
        redis.call('XACK', q, GROUP, id)
        redis.call('XDEL', q, id)
      end
    end
  until cursor == '0-0'
  return n
end

if redis.call('EXISTS', run) == 0 and ARGV[#ARGV] ~= 'create' then
  return {{'unknown_run'}}
end
"""

# ARGV: description JSON, model fingerprint, visibility timeout in ms and in s, 'create' (or '').
OPEN = (
    _PRELUDE
    + """
if redis.call('EXISTS', run) == 0 then
  redis.call('DEL', q, refs, uris, states, deliveries, leases, entries, ids)
  redis.call('XGROUP', 'CREATE', q, GROUP, '$', 'MKSTREAM')
  redis.call('HSET', run, 'description', ARGV[1], 'fingerprint', ARGV[2], 'timeout_ms', ARGV[3],
    'timeout_s', ARGV[4], 'sealed', '0', 'known', 0, 'pending', 0, 'leased', 0, 'acked', 0,
    'redelivered', 0, 'recomputed', 0)
end
return {'ok', redis.call('HGET', run, 'description')}
"""
)

# ARGV: sample id, reference JSON, store URI, the reference's run id, its model, this run's id.
PUT = (
    _PRELUDE
    + """
local sample = ARGV[1]
if ARGV[4] ~= ARGV[6] then return {'other_run'} end
local fingerprint = redis.call('HGET', run, 'fingerprint')
if ARGV[5] ~= fingerprint then return {'other_model', fingerprint} end
local state = redis.call('HGET', states, sample)
if not state then
  local sealed, total, known = unpack(redis.call('HMGET', run, 'sealed', 'total', 'known'))
  if sealed == '1' and tonumber(known) >= tonumber(total) then return {'sealed', total} end
  redis.call('HSET', refs, sample, ARGV[2])
  redis.call('HSET', uris, sample, ARGV[3])
  redis.call('HSET', states, sample, 'pending')
  redis.call('HSET', deliveries, sample, 0)
  redis.call('HSET', entries, sample, redis.call('XADD', q, '*', 'sample', sample))
  redis.call('ZADD', ids, 0, sample)
  redis.call('HINCRBY', run, 'known', 1)
  redis.call('HINCRBY', run, 'pending', 1)
  return {'new'}
end
if state == 'acked' then return {'acked'} end
if redis.call('HGET', uris, sample) ~= ARGV[3] then
  redis.call('HINCRBY', run, 'recomputed', 1)
end
redis.call('HSET', refs, sample, ARGV[2])
redis.call('HSET', uris, sample, ARGV[3])
return {'replaced'}
"""
)

# ARGV: consumer name, ''.
ACQUIRE = (
    _PRELUDE
    + """
reclaim()
local got = redis.call('XREADGROUP', 'GROUP', GROUP, ARGV[1], 'COUNT', 1, 'STREAMS', q, '>')
if not got then return {'none', closed() and 1 or 0} end
local entry = got[1][2][1]
local id, sample = entry[1], entry[2][2]
local n = redis.call('HINCRBY', deliveries, sample, 1)
local lease = id .. ':' .. n
redis.call('HSET', leases, sample, lease)
redis.call('HSET', states, sample, 'leased')
redis.call('HINCRBY', run, 'pending', -1)
redis.call('HINCRBY', run, 'leased', 1)
return {'lease', redis.call('HGET', refs, sample), lease, n - 1, redis.call('HGET', run, 'timeout_s')}
"""
)

# What ack and fail check first. ARGV: sample id, lease id, ''.
_HELD = """
local sample, lease = ARGV[1], ARGV[2]
local state = redis.call('HGET', states, sample)
if not state then return {'unknown_sample'} end
local held = redis.call('HGET', leases, sample)
"""

ACK = (
    _PRELUDE
    + _HELD
    + """
if state == 'acked' and held == lease then return {'ok'} end
if state ~= 'leased' or held ~= lease then return {'not_held', state} end
drop_entry(sample)
redis.call('HSET', states, sample, 'acked')
redis.call('HINCRBY', run, 'leased', -1)
redis.call('HINCRBY', run, 'acked', 1)
return {'ok'}
"""
)

FAIL = (
    _PRELUDE
    + _HELD
    + """
if state ~= 'leased' or held ~= lease then return {'not_held', state} end
requeue(sample)
return {'ok'}
"""
)

# ARGV: ''.
RECLAIM = _PRELUDE + "return {'ok', reclaim()}\n"

# ARGV: total, ''.
SEAL = (
    _PRELUDE
    + """
local sealed, total, known = unpack(redis.call('HMGET', run, 'sealed', 'total', 'known'))
if sealed == '1' and tonumber(total) ~= tonumber(ARGV[1]) then return {'sealed', total} end
if tonumber(known) > tonumber(ARGV[1]) then return {'too_many', known} end
redis.call('HSET', run, 'sealed', '1', 'total', ARGV[1])
return {'ok'}
"""
)

# ARGV: after ('' for the first page), limit, ''. Answers the ids, their states and store URIs.
SAMPLES = (
    _PRELUDE
    + """
local low = '-'
if ARGV[1] ~= '' then low = '(' .. ARGV[1] end
local page = redis.call('ZRANGE', ids, low, '+', 'BYLEX', 'LIMIT', 0, tonumber(ARGV[2]))
local found, where = {}, {}
for i, sample in ipairs(page) do
  found[i] = redis.call('HGET', states, sample)
  where[i] = redis.call('HGET', uris, sample)
end
return {'ok', page, found, where}
"""
)
