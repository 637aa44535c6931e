"""Lua scripts outside the consumer (whose settle scripts are ``streamproc.consumer._scripts``).

Every script touches keys of one topic only (they share the ``{topic}`` hash tag).
"""

from __future__ import annotations

from streamproc._lua import Lua

__all__ = ("DLQ_REPLAY",)

# Replay one dead letter: append its original fields to the target stream, delete it from the
# DLQ, count it. KEYS[1] DLQ, KEYS[2] target stream, KEYS[3] the group's replays hash (field
# dlq_replayed). ARGV: dlq entry id, field, value...
DLQ_REPLAY = Lua("""
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('HINCRBY', KEYS[3], 'dlq_replayed', 1)
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
""")
