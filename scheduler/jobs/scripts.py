"""The jobs store's Lua scripts: each state change of a job is one atomic script (see
:mod:`scheduler.jobs.store`). ``FINALIZE_HELPERS`` holds the Lua functions the others share."""

from __future__ import annotations

from scheduler.jobs.model import GROUP
from sluice.v1 import jobs_pb2

FINALIZE_HELPERS = f"""
local function finalize(job, lines, active, state, now)
  local f = redis.call('HMGET', job, 'total', 'completed', 'failed', 'cancelled', 'expired',
                       'retention_ms', 'job_id')
  local left = tonumber(f[1]) - tonumber(f[2]) - tonumber(f[3]) - tonumber(f[4]) - tonumber(f[5])
  if left < 0 then left = 0 end
  if state == {jobs_pb2.JOB_STATE_CANCELLED} then
    redis.call('HINCRBY', job, 'cancelled', left)
  elseif state == {jobs_pb2.JOB_STATE_EXPIRED} then
    redis.call('HINCRBY', job, 'expired', left)
  end
  local keep = tonumber(f[6])
  redis.call('HSET', job, 'state', state, 'finished_ms', now, 'expires_ms', now + keep)
  redis.call('DEL', lines)
  redis.call('ZREM', active, f[7])
  redis.call('PEXPIRE', job, keep)
  redis.call('PEXPIRE', KEYS[3], keep)
  local idem = redis.call('HGET', job, 'idem_redis_key')
  if idem and idem ~= '' and redis.call('GET', idem) == f[7] then
    redis.call('PEXPIRE', idem, keep)
  end
  return state
end
local function is_final(state)
  return state == {jobs_pb2.JOB_STATE_COMPLETED} or state == {jobs_pb2.JOB_STATE_FAILED}
      or state == {jobs_pb2.JOB_STATE_CANCELLED} or state == {jobs_pb2.JOB_STATE_EXPIRED}
end
local function pending(lines)
  if redis.call('EXISTS', lines) == 0 then return 0 end
  return redis.call('XPENDING', lines, '{GROUP}')[1]
end
"""

# KEYS: job, lines, results, active, tenant_jobs, idem | ARGV: job_id, created_ms, deadline_ms,
# idem_ttl_ms, has_idem, now_ms
COMMIT = (
    FINALIZE_HELPERS
    + f"""
if redis.call('HEXISTS', KEYS[1], 'job_id') == 0 then return '' end
if ARGV[5] == '1' then
  local other = redis.call('GET', KEYS[6])
  if other and other ~= ARGV[1]
     and redis.call('EXISTS', ARGV[7] .. other .. '}}') == 1 then
    return other
  end
  redis.call('SET', KEYS[6], ARGV[1], 'PX', ARGV[4])
  redis.call('HSET', KEYS[1], 'idem_redis_key', KEYS[6])
end
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[3])
redis.call('HSET', KEYS[1], 'state', {jobs_pb2.JOB_STATE_QUEUED})
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PERSIST', KEYS[2])
  redis.call('XGROUP', 'CREATE', KEYS[2], '{GROUP}', '0')
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
else
  finalize(KEYS[1], KEYS[2], KEYS[4], {jobs_pb2.JOB_STATE_COMPLETED}, tonumber(ARGV[6]))
end
return ARGV[1]
"""
)

# KEYS: job, lines, results, active, throughput | ARGV: entry_id, custom_id, result, outcome,
# dead (0/1), tokens, now_ms. Returns 0 job gone or final, 1 stored, 2 duplicate, 3 completed
# the job, 4 finished a cancelled job.
FINISH = (
    FINALIZE_HELPERS
    + f"""
local state = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
redis.call('XACK', KEYS[2], '{GROUP}', ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
if state == 0 or is_final(state) then return 0 end
if redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[3]) == 0 then return 2 end
redis.call('HINCRBY', KEYS[1], ARGV[4], 1)
if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[1], 'dead_lettered', 1) end
redis.call('HINCRBYFLOAT', KEYS[1], 'settled_tokens', ARGV[6])
redis.call('HDEL', KEYS[1], 'err:' .. ARGV[1])
if ARGV[4] == 'completed' then redis.call('HINCRBYFLOAT', KEYS[5], 'tokens', ARGV[6]) end
local now = tonumber(ARGV[7])
if state == {jobs_pb2.JOB_STATE_QUEUED} then
  redis.call('HSET', KEYS[1], 'state', {jobs_pb2.JOB_STATE_RUNNING})
end
local c = redis.call('HMGET', KEYS[1], 'total', 'completed', 'failed')
if tonumber(c[2]) + tonumber(c[3]) >= tonumber(c[1]) then
  finalize(KEYS[1], KEYS[2], KEYS[4], {jobs_pb2.JOB_STATE_COMPLETED}, now)
  return 3
end
if state == {jobs_pb2.JOB_STATE_CANCELLING} and pending(KEYS[2]) == 0 then
  finalize(KEYS[1], KEYS[2], KEYS[4], {jobs_pb2.JOB_STATE_CANCELLED}, now)
  return 4
end
return 1
"""
)

# KEYS: job, lines, results, active | ARGV: entry_id, now_ms
SETTLE = (
    FINALIZE_HELPERS
    + f"""
redis.call('XACK', KEYS[2], '{GROUP}', ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
local state = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
if state == {jobs_pb2.JOB_STATE_CANCELLING} and pending(KEYS[2]) == 0 then
  finalize(KEYS[1], KEYS[2], KEYS[4], {jobs_pb2.JOB_STATE_CANCELLED}, tonumber(ARGV[2]))
end
return state
"""
)

# KEYS: job, lines, results, active | ARGV: now_ms. Returns the state after.
CANCEL = (
    FINALIZE_HELPERS
    + f"""
local state = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
if state == 0 or is_final(state) then return state end
if pending(KEYS[2]) == 0 then
  return finalize(KEYS[1], KEYS[2], KEYS[4], {jobs_pb2.JOB_STATE_CANCELLED}, tonumber(ARGV[1]))
end
redis.call('HSET', KEYS[1], 'state', {jobs_pb2.JOB_STATE_CANCELLING})
return {jobs_pb2.JOB_STATE_CANCELLING}
"""
)

# KEYS: job, lines, results, active | ARGV: state, now_ms. Returns the state after.
FINALIZE_NOW = (
    FINALIZE_HELPERS
    + f"""
local state = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
if state == 0 or is_final(state) then return {{0, state}} end
local target = tonumber(ARGV[1])
if state == {jobs_pb2.JOB_STATE_CANCELLING} then target = {jobs_pb2.JOB_STATE_CANCELLED} end
return {{1, finalize(KEYS[1], KEYS[2], KEYS[4], target, tonumber(ARGV[2]))}}
"""
)


STARTED = """
if redis.call('HGET', KEYS[1], 'started_ms') == '0' then
  redis.call('HSET', KEYS[1], 'started_ms', ARGV[1])
end
return 1
"""
