-- Remove one route of a node if it still points to that node (dead-node cleanup and
-- graceful deregistration, protocol section 8).
--
-- KEYS[1] {tenant}:online:{user}
-- KEYS[2] {tenant}:conn_leases
-- KEYS[3] {tenant}:user:{user}:conn_leases
-- KEYS[4] nodes:live
-- ARGV[1] device id
-- ARGV[2] node id
-- ARGV[3] tenant lease member "user|device"
-- ARGV[4] now, Unix ms
-- ARGV[5] "1": only while the node is dead (its nodes:live score is below now)
--
-- Returns 1 if removed, 0 if the route is gone or points elsewhere, -1 if the node
-- is live again (nothing done; the cleanup stops).

if ARGV[5] == '1' then
  local score = redis.call('ZSCORE', KEYS[4], ARGV[2])
  if score and tonumber(score) >= tonumber(ARGV[4]) then
    return -1
  end
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
  return 0
end
local node = string.match(current, '^([^|]*)|')
if node ~= ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
