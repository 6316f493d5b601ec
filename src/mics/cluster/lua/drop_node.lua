-- Delete a node's keys once its routes are gone (protocol section 8).
--
-- KEYS[1] nodes:live
-- KEYS[2] nodes:known
-- KEYS[3] nodes:{nodeId}
-- KEYS[4] nodes:{nodeId}:routes
-- ARGV[1] node id
-- ARGV[2] now, Unix ms
-- ARGV[3] "1": only while the node is dead
--
-- Returns 1 if the node was removed from nodes:known, 0 if it was not there (someone
-- else finished first), -1 if it is live again (nothing done).

if ARGV[3] == '1' then
  local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if score and tonumber(score) >= tonumber(ARGV[2]) then
    return -1
  end
end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('SREM', KEYS[2], ARGV[1])
