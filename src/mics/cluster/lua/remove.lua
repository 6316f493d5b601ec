-- Unregister a route (protocol section 8): compare-and-delete on node and connection.
--
-- KEYS[1] {tenant}:online:{user}
-- KEYS[2] {tenant}:conn_leases
-- KEYS[3] {tenant}:user:{user}:conn_leases
-- KEYS[4] nodes:{nodeId}:routes
-- ARGV[1] device id
-- ARGV[2] node id
-- ARGV[3] connection id
-- ARGV[4] tenant lease member "user|device"
-- ARGV[5] node routes member "tenant|user|device"
--
-- Returns 1 if the route named this connection and was deleted, else 0.

local deleted = 0
local keep_entry = false
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local node, _, conn = string.match(current, '^([^|]*)|([^|]*)|([^|]*)|[^|]*$')
  if node == ARGV[2] and conn == ARGV[3] then
    redis.call('HDEL', KEYS[1], ARGV[1])
    redis.call('ZREM', KEYS[3], ARGV[1])
    redis.call('ZREM', KEYS[2], ARGV[4])
    deleted = 1
  elseif node == ARGV[2] then
    -- A newer connection of the same device on the same node owns the field: the
    -- node's routes entry is still needed for its dead-node cleanup.
    keep_entry = true
  end
end
if not keep_entry then
  redis.call('SREM', KEYS[4], ARGV[5])
end
return deleted
