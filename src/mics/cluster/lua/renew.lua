-- Renew the lease of a live route (protocol section 8, "Renew").
--
-- KEYS[1] {tenant}:online:{user}
-- KEYS[2] {tenant}:conn_leases
-- KEYS[3] {tenant}:user:{user}:conn_leases
-- ARGV[1] device id
-- ARGV[2] node id
-- ARGV[3] connection id
-- ARGV[4] tenant lease member "user|device"
-- ARGV[5] new lease expiry, Unix ms
-- ARGV[6] key expiry (2 x lease TTL), ms
--
-- Returns 1 if renewed; 0 if the route is lost: the field no longer names this
-- connection, or a lease entry is gone (it expired and was dropped). A lost route is
-- not re-created here, since that would bypass the limits; the caller re-admits it.

local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
  return 0
end
local node, _, conn = string.match(current, '^([^|]*)|([^|]*)|([^|]*)|[^|]*$')
if node ~= ARGV[2] or conn ~= ARGV[3] then
  return 0
end
if not redis.call('ZSCORE', KEYS[3], ARGV[1]) or not redis.call('ZSCORE', KEYS[2], ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[3], 'XX', ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[2], 'XX', ARGV[5], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
return 1
