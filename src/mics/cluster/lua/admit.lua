-- Register a route (protocol section 8), atomically with the connection limits.
--
-- KEYS[1] {tenant}:online:{user}              HASH  device -> "nodeId|endpoint|connId|onlineAtMs"
-- KEYS[2] {tenant}:conn_leases                ZSET  "user|device", score = lease expiry ms
-- KEYS[3] {tenant}:user:{user}:conn_leases    ZSET  "device", score = lease expiry ms
-- KEYS[4] nodes:{nodeId}:routes               SET   "tenant|user|device"
-- ARGV[1] device id
-- ARGV[2] route value "nodeId|endpoint|connId|onlineAtMs"
-- ARGV[3] tenant lease member "user|device"
-- ARGV[4] node routes member "tenant|user|device"
-- ARGV[5] now, Unix ms
-- ARGV[6] lease TTL, ms
-- ARGV[7] user connection limit (<= 0: none)
-- ARGV[8] tenant connection limit (<= 0: none)
--
-- Returns {status, previous}: status is "admitted", "replaced", "denied_user" or
-- "denied_tenant"; previous is the overwritten route value ("" unless replaced).

local now = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])

-- Drop expired leases. A device of this user whose lease expired no longer holds a
-- slot; its hash field is a stale route, so it goes too.
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, device in ipairs(expired) do
  redis.call('HDEL', KEYS[1], device)
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)

local status = 'admitted'
local previous = redis.call('HGET', KEYS[1], ARGV[1])
if previous then
  status = 'replaced'  -- takeover: no limit check
else
  previous = ''
  local user_limit = tonumber(ARGV[7])
  if user_limit > 0 and redis.call('ZCARD', KEYS[3]) >= user_limit then
    return {'denied_user', ''}
  end
  local tenant_limit = tonumber(ARGV[8])
  if tenant_limit > 0 and redis.call('ZCARD', KEYS[2]) >= tenant_limit then
    return {'denied_tenant', ''}
  end
end

local expiry = now + ttl
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('ZADD', KEYS[3], expiry, ARGV[1])
redis.call('ZADD', KEYS[2], expiry, ARGV[3])
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
redis.call('PEXPIRE', KEYS[2], 2 * ttl)
redis.call('PEXPIRE', KEYS[3], 2 * ttl)
return {status, previous}
