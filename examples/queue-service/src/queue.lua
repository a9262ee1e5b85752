-- The job-queue engine on Redis: one script, every operation atomic, on the
-- server's clock (TIME). ARGV: prefix, op, ttl ms, lease ms, max attempts,
-- backoff base ms, backoff cap ms, jitter unit, then the op's own arguments.
-- Every key is built from the prefix (the demo's namespace); every key it writes
-- expires: a job, its dedup entry and its index entries at the job's expiry, the
-- indexes and the sequence counter one TTL after the last write.
local P = ARGV[1]
local op = ARGV[2]
local ttl = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
local max_attempts = tonumber(ARGV[5])
local base = tonumber(ARGV[6])
local cap = tonumber(ARGV[7])
local jitter = tonumber(ARGV[8])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local READY, RETRY, LEASES, EXPIRY, CHANGED, SEQ =
  P .. 'ready', P .. 'retry', P .. 'leases', P .. 'expiry', P .. 'changed', P .. 'seq'
local STATES = {'queued', 'running', 'completed', 'failed', 'cancelled', 'dead_lettered'}
local OPEN = {queued = true, running = true, failed = true}
local FINISHED = {'completed', 'cancelled', 'dead_lettered'}
local LEGAL = {
  queued = {running = true, cancelled = true},
  running = {completed = true, failed = true, cancelled = true, dead_lettered = true},
  failed = {running = true, cancelled = true},
}
local function st(s) return P .. 'st:' .. s end
local function jk(id) return P .. 'job:' .. id end
local function dk(h) return P .. 'dedup:' .. h end
local function num(x) return string.format('%.0f', x) end

local function view(id)
  local j = redis.call('HMGET', jk(id), 'state', 'pri', 'prog', 'att', 'exp', 'owner', 'work')
  if not j[1] then return nil end
  local left = tonumber(j[5]) - now
  if left < 0 then left = 0 end
  return {id = id, state = j[1], priority = tonumber(j[2]), progress = tonumber(j[3]),
    attempts = tonumber(j[4]), expires_in_ms = left, owner = j[6], work = j[7]}
end

-- Drops a job from every index (its hash may already have expired).
local function remove(id)
  local h = redis.call('HGET', jk(id), 'h')
  if h and redis.call('GET', dk(h)) == id then redis.call('DEL', dk(h)) end
  redis.call('DEL', jk(id))
  for _, z in ipairs({READY, RETRY, LEASES, EXPIRY, CHANGED}) do redis.call('ZREM', z, id) end
  for _, s in ipairs(STATES) do redis.call('ZREM', st(s), id) end
end

local function ready_score(pri, seq) return (255 - pri) * 17592186044416 + seq end

-- Moves a job to `to`; `att` sets its attempts, `delay` its retry backoff. Returns
-- {'ok', view}, {'illegal', from} or {'nf'}.
local function transition(id, to, att, delay)
  local k = jk(id)
  local j = redis.call('HMGET', k, 'state', 'pri', 'seq', 'exp')
  local from = j[1]
  if not from then return {'nf'} end
  if from == 'completed' and to == 'completed' then return {'ok', view(id)} end
  local waiting = from == 'failed' and not redis.call('ZSCORE', READY, id)
  if not (LEGAL[from] and LEGAL[from][to]) or (to == 'running' and waiting) then
    return {'illegal', from}
  end
  redis.call('ZREM', READY, id)
  redis.call('ZREM', RETRY, id)
  redis.call('ZREM', LEASES, id)
  redis.call('HDEL', k, 'retry', 'lease')
  redis.call('ZREM', st(from), id)
  redis.call('ZADD', st(to), j[4], id)
  redis.call('HSET', k, 'state', to, 'changed', num(now))
  redis.call('ZADD', CHANGED, num(now), id)
  if to == 'completed' then redis.call('HSET', k, 'prog', 100) end
  if att then redis.call('HSET', k, 'att', att) end
  if to == 'running' then
    redis.call('HSET', k, 'lease', num(now + lease))
    redis.call('ZADD', LEASES, num(now + lease), id)
    redis.call('HINCRBY', k, 'claims', 1)
  elseif to == 'failed' then
    redis.call('HSET', k, 'retry', num(now + delay))
    redis.call('ZADD', RETRY, num(now + delay), id)
  end
  return {'ok', view(id)}
end

-- A failed attempt of a running job: failed with a full-jitter backoff, or
-- dead-lettered after max_attempts.
local function fail_attempt(id, unit)
  local att = tonumber(redis.call('HGET', jk(id), 'att'))
  if not att then return {'nf'} end
  att = att + 1
  local to = 'failed'
  if att >= max_attempts then to = 'dead_lettered' end
  local exp = att - 1
  if exp > 31 then exp = 31 end
  local ceiling = base * (2 ^ exp)
  if ceiling > cap then ceiling = cap end
  return transition(id, to, att, unit % (ceiling + 1))
end

-- Brings the queue up to now: purges expired jobs, fails lapsed leases, readies
-- due retries (each bounded per call).
local function tick()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', num(now), 'LIMIT', 0, 1000)) do
    remove(id)
  end
  for i, id in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', num(now), 'LIMIT', 0, 1000)) do
    fail_attempt(id, jitter + i * 104729)
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', RETRY, '-inf', num(now), 'LIMIT', 0, 1000)) do
    local j = redis.call('HMGET', jk(id), 'pri', 'seq')
    redis.call('ZREM', RETRY, id)
    if j[1] then redis.call('ZADD', READY, num(ready_score(tonumber(j[1]), tonumber(j[2]))), id) end
  end
end

local function touch()
  for _, k in ipairs({READY, RETRY, LEASES, EXPIRY, CHANGED, SEQ}) do redis.call('PEXPIRE', k, ttl) end
  for _, s in ipairs(STATES) do redis.call('PEXPIRE', st(s), ttl) end
end

local function open_count()
  return redis.call('ZCARD', st('queued')) + redis.call('ZCARD', st('running'))
    + redis.call('ZCARD', st('failed'))
end

local function views(ids)
  local out = {}
  for _, id in ipairs(ids) do
    local v = view(id)
    if v then out[#out + 1] = v end
  end
  return out
end

-- A running job claimed by another run than the one after `expected` failed
-- attempts (when given): the state that refuses the change, else nil.
local function stale(id, expected)
  if not expected or expected == '' then return nil end
  local j = redis.call('HMGET', jk(id), 'state', 'att')
  if j[1] == 'running' and j[2] ~= expected then return 'running' end
  return nil
end

local function reply(r)
  if r[1] == 'ok' then return cjson.encode({ok = r[2]}) end
  if r[1] == 'illegal' then return cjson.encode({illegal = r[2]}) end
  return cjson.encode({nf = true})
end

tick()
local result
if op == 'enqueue' then
  -- owner, hmac hex, work, priority, new id, max depth, max retained
  local owner, h, work, pri, id = ARGV[9], ARGV[10], ARGV[11], tonumber(ARGV[12]), ARGV[13]
  local max_depth, max_retained = tonumber(ARGV[14]), tonumber(ARGV[15])
  local existing = redis.call('GET', dk(h))
  local v = existing and view(existing)
  if v then
    result = cjson.encode({existing = v})
  elseif open_count() >= max_depth then
    result = cjson.encode({full = true})
  else
    local room = redis.call('ZCARD', EXPIRY) < max_retained
    if not room then
      local oldest, at = nil, nil
      for _, s in ipairs(FINISHED) do
        local first = redis.call('ZRANGE', st(s), 0, 0, 'WITHSCORES')
        if first[1] and (not at or tonumber(first[2]) < at) then
          oldest, at = first[1], tonumber(first[2])
        end
      end
      if oldest then
        remove(oldest)
        room = true
      end
    end
    if not room then
      result = cjson.encode({full = true})
    else
      local seq = redis.call('INCR', SEQ)
      local exp = now + ttl
      local k = jk(id)
      redis.call('HSET', k, 'owner', owner, 'work', work, 'pri', pri, 'seq', seq, 'state', 'queued',
        'prog', 0, 'att', 0, 'exp', num(exp), 'changed', num(now), 'h', h, 'claims', 0)
      redis.call('PEXPIREAT', k, num(exp))
      redis.call('SET', dk(h), id, 'PXAT', num(exp))
      redis.call('ZADD', READY, num(ready_score(pri, seq)), id)
      redis.call('ZADD', EXPIRY, num(exp), id)
      redis.call('ZADD', st('queued'), num(exp), id)
      result = cjson.encode({new = view(id)})
    end
  end
elseif op == 'get' then
  local v = view(ARGV[9])
  if v then result = cjson.encode({ok = v}) else result = cjson.encode({nf = true}) end
elseif op == 'peek' then
  local first = redis.call('ZRANGE', READY, 0, 0)
  local v = first[1] and view(first[1])
  if v then result = cjson.encode({ok = v}) else result = cjson.encode({none = true}) end
elseif op == 'set' then
  -- id, state, the claiming run's attempts ('' for any)
  local s = redis.call('HGET', jk(ARGV[9]), 'state')
  local stale_by = ARGV[10] ~= 'running' and s ~= 'completed' and stale(ARGV[9], ARGV[11])
  if stale_by then
    result = cjson.encode({illegal = stale_by})
  else
    result = reply(transition(ARGV[9], ARGV[10]))
  end
elseif op == 'fail' then
  -- id, the claiming run's attempts ('' for any)
  local s = redis.call('HGET', jk(ARGV[9]), 'state')
  if s and s ~= 'running' then
    result = cjson.encode({illegal = s})
  elseif stale(ARGV[9], ARGV[10]) then
    result = cjson.encode({illegal = 'running'})
  else
    result = reply(fail_attempt(ARGV[9], jitter))
  end
elseif op == 'progress' then
  -- id, progress, the claiming run's attempts ('' for any)
  local id, p = ARGV[9], tonumber(ARGV[10])
  local s = redis.call('HGET', jk(id), 'state')
  if stale(id, ARGV[11]) then
    result = cjson.encode({illegal = 'running'})
  elseif not s then
    result = cjson.encode({nf = true})
  elseif s ~= 'running' then
    result = cjson.encode({illegal = s})
  else
    redis.call('HSET', jk(id), 'prog', p, 'changed', num(now), 'lease', num(now + lease))
    redis.call('ZADD', CHANGED, num(now), id)
    redis.call('ZADD', LEASES, num(now + lease), id)
    result = cjson.encode({ok = view(id)})
  end
elseif op == 'stats' then
  local counts = {}
  for _, s in ipairs(STATES) do counts[s] = redis.call('ZCARD', st(s)) end
  result = cjson.encode({stats = counts})
elseif op == 'dead' then
  result = cjson.encode({list = views(redis.call('ZRANGE', st('dead_lettered'), 0, tonumber(ARGV[9]) - 1))})
elseif op == 'latest' then
  result = cjson.encode({list = views(redis.call('ZREVRANGE', CHANGED, 0, tonumber(ARGV[9]) - 1))})
elseif op == 'next_retry' then
  local first = redis.call('ZRANGE', RETRY, 0, 0, 'WITHSCORES')
  if first[1] then
    local d = tonumber(first[2]) - now
    if d < 0 then d = 0 end
    result = cjson.encode({retry_in_ms = d})
  else
    result = cjson.encode({none = true})
  end
else
  return redis.error_reply('unknown operation')
end
touch()
return result
