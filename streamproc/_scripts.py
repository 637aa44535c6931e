"""The Lua scripts that make each settle step atomic and safe to send twice.

Every script touches keys of one topic only (they share the ``{topic}`` hash tag).
"""

from __future__ import annotations

from streamproc._lua import Lua

__all__ = ("DLQ_REPLAY", "FAIL", "PUMP", "SUCCEED")

# Success for a batch of entries of one stream.
# KEYS[1] stream, KEYS[2..] the dedup marks of the batch. ARGV: group, window_ms, then per
# entry: id, index of its mark in KEYS (0 = no dedup), number of effect commands, and per
# command: number of args, args...
# A fresh mark (SET NX) runs the effects; a present mark means another delivery already
# applied them. Every entry is acked. Returns {acked, duplicates}.
SUCCEED = Lua("""
local group, window = ARGV[1], ARGV[2]
local i, acked, dups = 3, 0, 0
while i <= #ARGV do
  local id, seen, ncmd = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  local fresh = true
  if seen > 0 then
    fresh = redis.call('SET', KEYS[seen], id, 'NX', 'PX', window)
  end
  if not fresh then dups = dups + 1 end
  for _ = 1, ncmd do
    local n = tonumber(ARGV[i])
    if fresh then redis.call(unpack(ARGV, i + 1, i + n)) end
    i = i + n + 1
  end
  acked = acked + redis.call('XACK', KEYS[1], group, id)
end
return {acked, dups}
""")

# Failure of one entry: ack it and, only if it was still pending (so a copy sent twice, or a
# second consumer, does nothing), schedule its retry or dead-letter it.
# KEYS[1] stream, KEYS[2] delayed zset (retry) or DLQ stream (dlq).
# ARGV: group, id, 'retry'|'dlq', due ms (retry), member (retry) | field, value... (dlq)
FAIL = Lua("""
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
if ARGV[3] == 'retry' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
else
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
end
return 1
""")

# Move retries that came due from the delayed zset to the group's retry stream.
# KEYS[1] delayed zset, KEYS[2] retry stream. ARGV: now ms, limit. Returns how many moved.
PUMP = Lua("""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, m in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', unpack(cjson.decode(m)))
  redis.call('ZREM', KEYS[1], m)
end
return #due
""")

# Replay one dead letter: append its original fields to the target stream, delete it from the
# DLQ, count it. KEYS[1] DLQ, KEYS[2] target stream, KEYS[3] the group's replays hash (field
# dlq_replayed). ARGV: dlq entry id, field, value...
DLQ_REPLAY = Lua("""
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('HINCRBY', KEYS[3], 'dlq_replayed', 1)
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
""")
