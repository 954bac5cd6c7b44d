"""The queue's state transitions as Lua scripts, so each one is atomic on the Redis server.

Each script reads the job's hash before it acts, which makes a retried call (its reply lost with the
connection) harmless: a second run sees the state the first one left. States are the `JobState` numbers
(1 queued, 2 running, 3 succeeded, 4 failed, 5 cancelled; 3 and above are final). Time comes from the
server's TIME, so every worker agrees on one clock.
"""

import redis

__all__ = ["Scripts"]

MAX_EVENTS = 10_000  # a job's events stream is trimmed (approximately) to this many entries

_PRELUDE = (
    f"local MAX_EVENTS = {MAX_EVENTS}\n"
    + """
local function stamp()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function event(key, state, message, attempt)
  redis.call('XADD', key, 'MAXLEN', '~', MAX_EVENTS, '*', 'state', state, 'message', message,
             'progress', '-1', 'attempt', attempt)
end
local function drop(stream, group, entry)
  if entry and entry ~= '' then
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
  end
end
-- For an entry whose job is gone ('missing') or already final ('final'): ack it and say which; nil otherwise.
local function settle(job, stream, group, entry)
  local state = redis.call('HGET', job, 'state')
  if state and tonumber(state) < 3 then return nil end
  drop(stream, group, entry)
  if not state then return 'missing' end
  return 'final'
end
-- Start an attempt of the job a stream entry names. Returns {'run', attempt} | {'final', state} |
-- {'stale'} | {'unknown'} | {'dead', error}; every outcome but 'run' also acks and deletes the entry.
local function start_job(job, events, stream, dead, id, entry, group, consumer, max_attempts, raw)
  local state = redis.call('HGET', job, 'state')
  if not state then
    redis.call('XADD', dead, '*', 'job_id', id, 'entry', entry, 'attempt', 0, 'raw:id', id, 'raw:job', raw,
               'error', 'no status hash for job ' .. id .. ' (it was not submitted through JobQueue.submit)')
    drop(stream, group, entry)
    return {'unknown'}
  end
  state = tonumber(state)
  if state >= 3 then
    drop(stream, group, entry)
    return {'final', tostring(state)}
  end
  if redis.call('HGET', job, 'entry') ~= entry then
    drop(stream, group, entry)
    return {'stale'}
  end
  local now = string.format('%.6f', stamp())
  local attempts = tonumber(redis.call('HGET', job, 'attempts'))
  if redis.call('HGET', job, 'cancel') == '1' then
    redis.call('HSET', job, 'state', 5, 'worker', '', 'entry', '', 'updated', now)
    drop(stream, group, entry)
    event(events, 5, 'cancelled (its worker was lost after the cancel request)', attempts)
    return {'final', '5'}
  end
  if state == 2 then
    local previous = redis.call('HGET', job, 'worker') or ''
    redis.call('HSET', job, 'error', 'attempt ' .. attempts .. ': worker ' .. previous ..
               ' stopped heartbeating (lost for longer than the visibility timeout)')
  end
  local base = tonumber(redis.call('HGET', job, 'base') or '0')
  if attempts + 1 - base > tonumber(max_attempts) then
    local err = redis.call('HGET', job, 'error') or 'attempts exhausted'
    redis.call('HSET', job, 'state', 4, 'worker', '', 'entry', '', 'updated', now)
    redis.call('XADD', dead, '*', 'job_id', id, 'entry', entry, 'attempt', attempts,
               'job', redis.call('HGET', job, 'job'), 'error', err)
    drop(stream, group, entry)
    event(events, 4, 'dead-lettered after ' .. (attempts - base) .. ' attempts: ' .. err, attempts)
    return {'dead', err}
  end
  attempts = redis.call('HINCRBY', job, 'attempts', 1)
  redis.call('HSET', job, 'state', 2, 'worker', consumer, 'updated', now, 'heartbeat', now)
  event(events, 2, 'running attempt ' .. attempts .. ' on ' .. consumer, attempts)
  return {'run', tostring(attempts)}
end
"""
)

# KEYS: job, events, stream, index, idempotency   ARGV: id, job bytes, kind, use idempotency ('1'/'0')
_SUBMIT = """
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return existing end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return ARGV[1] end
local now = string.format('%.6f', stamp())
local entry = redis.call('XADD', KEYS[3], '*', 'id', ARGV[1], 'job', ARGV[2])
redis.call('HSET', KEYS[1], 'job', ARGV[2], 'kind', ARGV[3], 'state', 1, 'attempts', 0, 'base', 0,
           'entry', entry, 'created', now, 'updated', now)
redis.call('ZADD', KEYS[4], now, ARGV[1])
if ARGV[4] == '1' then redis.call('SET', KEYS[5], ARGV[1]) end
event(KEYS[2], 1, 'queued', 0)
return ARGV[1]
"""

# KEYS: job, events, stream, dead   ARGV: id, entry, group, consumer, max attempts, raw job bytes
_START = """
return start_job(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
"""

# KEYS: stream, dead   ARGV: group, consumer, job key prefix, max attempts
# Take the next new entry (no blocking) and start it in the same step: one round trip on a busy queue.
# Returns nil when there is none, else {entry id, fields, start outcome}; the outcome is {'unparsed'} for
# an entry without an id field (the worker dead-letters it).
_CLAIM = """
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
if not reply then return false end
local entry = reply[1][2][1]
local fields = entry[2]
local id, raw = '', ''
for i = 1, #fields, 2 do
  if fields[i] == 'id' then id = fields[i + 1] elseif fields[i] == 'job' then raw = fields[i + 1] end
end
if id == '' then return {entry[1], fields, {'unparsed'}} end
local job = ARGV[3] .. id
local outcome = start_job(job, job .. ':events', KEYS[1], KEYS[2], id, entry[1], ARGV[1], ARGV[2], ARGV[4], raw)
return {entry[1], fields, outcome}
"""

# KEYS: job, stream   ARGV: entry, attempt, group, consumer   Returns 'ok' | 'cancel' | 'lost'.
_HEARTBEAT = """
local s = redis.call('HMGET', KEYS[1], 'state', 'attempts', 'worker', 'cancel')
if s[1] ~= '2' or s[2] ~= ARGV[2] or s[3] ~= ARGV[4] then return 'lost' end
redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[4], 0, ARGV[1], 'JUSTID')
redis.call('HSET', KEYS[1], 'heartbeat', string.format('%.6f', stamp()))
if s[4] == '1' then return 'cancel' end
return 'ok'
"""

# KEYS: job, events, stream   ARGV: entry, attempt, group, result json, child ids (space separated)
# The first finisher wins: a job that is not final takes the result, even from a worker whose lease was
# taken over (its work is done); a final job never changes. Returns 'stored' | 'final' | 'missing'.
_SUCCEED = """
local settled = settle(KEYS[1], KEYS[3], ARGV[3], ARGV[1])
if settled then return settled end
local live = redis.call('HGET', KEYS[1], 'entry')
redis.call('HSET', KEYS[1], 'state', 3, 'result', ARGV[4], 'children', ARGV[5], 'worker', '', 'entry', '',
           'updated', string.format('%.6f', stamp()))
drop(KEYS[3], ARGV[3], ARGV[1])
if live ~= ARGV[1] then drop(KEYS[3], ARGV[3], live) end
event(KEYS[2], 3, 'succeeded', ARGV[2])
return 'stored'
"""

# KEYS: job, events, stream, dead, delayed   ARGV: entry, attempt, group, error, max attempts, backoff s, id
# Only the current attempt may fail the job. Returns 'retry' | 'dead' | 'cancelled' | 'stale' | 'final' | 'missing'.
_FAIL = """
local settled = settle(KEYS[1], KEYS[3], ARGV[3], ARGV[1])
if settled then return settled end
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2] then return 'stale' end
local now = stamp()
local ts = string.format('%.6f', now)
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  redis.call('HSET', KEYS[1], 'state', 5, 'error', ARGV[4], 'worker', '', 'entry', '', 'updated', ts)
  drop(KEYS[3], ARGV[3], ARGV[1])
  event(KEYS[2], 5, 'cancelled (the attempt failed after the cancel request: ' .. ARGV[4] .. ')', ARGV[2])
  return 'cancelled'
end
local base = tonumber(redis.call('HGET', KEYS[1], 'base') or '0')
if tonumber(ARGV[2]) - base >= tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'state', 4, 'error', ARGV[4], 'worker', '', 'entry', '', 'updated', ts)
  redis.call('XADD', KEYS[4], '*', 'job_id', ARGV[7], 'entry', ARGV[1], 'attempt', ARGV[2],
             'job', redis.call('HGET', KEYS[1], 'job'), 'error', ARGV[4])
  drop(KEYS[3], ARGV[3], ARGV[1])
  event(KEYS[2], 4, 'failed after ' .. (tonumber(ARGV[2]) - base) .. ' attempts: ' .. ARGV[4], ARGV[2])
  return 'dead'
end
redis.call('HSET', KEYS[1], 'state', 1, 'error', ARGV[4], 'worker', '', 'entry', '', 'updated', ts)
redis.call('ZADD', KEYS[5], string.format('%.6f', now + tonumber(ARGV[6])), ARGV[7])
drop(KEYS[3], ARGV[3], ARGV[1])
event(KEYS[2], 1, 'attempt ' .. ARGV[2] .. ' failed: ' .. ARGV[4] .. '; retrying in ' .. ARGV[6] .. ' s', ARGV[2])
return 'retry'
"""

# KEYS: job, events, stream   ARGV: entry, attempt, group, message
# The handler stopped on a cancel. Returns 'cancelled' | 'stale' | 'final' | 'missing'.
_CANCELLED = """
local settled = settle(KEYS[1], KEYS[3], ARGV[3], ARGV[1])
if settled then return settled end
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2] then return 'stale' end
redis.call('HSET', KEYS[1], 'state', 5, 'worker', '', 'entry', '', 'updated', string.format('%.6f', stamp()))
drop(KEYS[3], ARGV[3], ARGV[1])
event(KEYS[2], 5, ARGV[4], ARGV[2])
return 'cancelled'
"""

# KEYS: job, events, delayed   ARGV: id   Returns 'cancelled' | 'requested' | 'final' | 'missing'.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
local attempts = redis.call('HGET', KEYS[1], 'attempts')
local now = string.format('%.6f', stamp())
if state == '1' then
  redis.call('HSET', KEYS[1], 'state', 5, 'updated', now)
  redis.call('ZREM', KEYS[3], ARGV[1])
  event(KEYS[2], 5, 'cancelled while queued', attempts)
  return 'cancelled'
end
if state == '2' then
  if redis.call('HGET', KEYS[1], 'cancel') ~= '1' then
    redis.call('HSET', KEYS[1], 'cancel', 1, 'updated', now)
    event(KEYS[2], 2, 'cancel requested', attempts)
  end
  return 'requested'
end
return 'final'
"""

# KEYS: delayed, stream   ARGV: job key prefix, limit   Moves due retries back into the stream.
_PROMOTE = """
local now = stamp()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now), 'LIMIT', 0, ARGV[2])
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[1] .. id
  if redis.call('HGET', key, 'state') == '1' then
    local entry = redis.call('XADD', KEYS[2], '*', 'id', id, 'job', redis.call('HGET', key, 'job'))
    redis.call('HSET', key, 'entry', entry, 'updated', string.format('%.6f', now))
  end
end
return #due
"""

# KEYS: dead, stream, job, events   ARGV: dead entry, id   Returns 'requeued' | 'skip'.
_REQUEUE = """
if redis.call('HGET', KEYS[3], 'state') ~= '4' then return 'skip' end
local attempts = redis.call('HGET', KEYS[3], 'attempts')
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[2], 'job', redis.call('HGET', KEYS[3], 'job'))
redis.call('HSET', KEYS[3], 'state', 1, 'entry', entry, 'base', attempts, 'worker', '',
           'updated', string.format('%.6f', stamp()))
redis.call('HDEL', KEYS[3], 'cancel')
redis.call('XDEL', KEYS[1], ARGV[1])
event(KEYS[4], 1, 'requeued from the dead letters', attempts)
return 'requeued'
"""

# KEYS: dead, stream, job, events   ARGV: entry, group, error, job id or '', then raw field/value pairs
# A stream entry that is not a valid job: keep it whole in the dead letters and take it off the stream.
_DEAD_LETTER_ENTRY = """
local fields = {'job_id', ARGV[4], 'entry', ARGV[1], 'attempt', 0, 'error', ARGV[3]}
for i = 5, #ARGV, 2 do
  table.insert(fields, 'raw:' .. ARGV[i])
  table.insert(fields, ARGV[i + 1])
end
redis.call('XADD', KEYS[1], '*', unpack(fields))
if ARGV[4] ~= '' and redis.call('HGET', KEYS[3], 'entry') == ARGV[1] then
  redis.call('HSET', KEYS[3], 'state', 4, 'error', ARGV[3], 'worker', '', 'entry', '',
             'updated', string.format('%.6f', stamp()))
  event(KEYS[4], 4, 'dead-lettered: ' .. ARGV[3], redis.call('HGET', KEYS[3], 'attempts'))
end
drop(KEYS[2], ARGV[2], ARGV[1])
return 'dead'
"""


class Scripts:
    """The registered scripts of one client (redis-py loads each with EVALSHA, reloading after a restart)."""

    def __init__(self, client: redis.Redis) -> None:
        def register(body: str) -> redis.commands.core.Script:
            return client.register_script(_PRELUDE + body)

        self.submit = register(_SUBMIT)
        self.start = register(_START)
        self.claim = register(_CLAIM)
        self.heartbeat = register(_HEARTBEAT)
        self.succeed = register(_SUCCEED)
        self.fail = register(_FAIL)
        self.cancelled = register(_CANCELLED)
        self.cancel = register(_CANCEL)
        self.promote = register(_PROMOTE)
        self.requeue = register(_REQUEUE)
        self.dead_letter_entry = register(_DEAD_LETTER_ENTRY)
