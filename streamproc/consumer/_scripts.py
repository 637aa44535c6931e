"""The consumer's Lua scripts: each settle and upkeep step is one atomic call.

Every script touches keys of one topic only (they share the ``{topic}`` hash tag) and is safe
to send twice: a settle resent after a lost reply changes nothing the first one did. Scripts
read the time with ``TIME`` (Redis' clock, one for every host), never a host's clock. Each
returns what it did; the callers check and count it.
"""

from __future__ import annotations

from streamproc._lua import Lua

__all__ = (
    "CLAIM_NAME",
    "EXPIRE_CONSUMERS",
    "FAIL",
    "PARK",
    "PUMP",
    "RECLAIM",
    "RELEASE_NAME",
    "RENEW",
    "SUCCEED",
    "UNCOUNT",
)

_NOW = """
local _t = redis.call('TIME')
local now = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)
"""

# Effects: a closed set of single-key write commands, each validated against its arguments,
# the key's type and (for increments) the current value BEFORE the first write, so that an
# event's effects apply all together or not at all. Spec: family, min args, max args (-1: any),
# then checks: 'int@N' / 'num@N' (argument N is an integer / a number), 'pairs@N' (from
# argument N on, pairs), 'curint' / 'curnum' (current string value), 'hcurint@N' / 'hcurnum@N'
# (current value of hash field N), 'star@N' (argument N is '*'), 'setopts'.
_EFFECTS = r"""
local SPEC = {
  set = {'any', 2, 6, 'setopts'}, append = {'string', 2, 2},
  incr = {'string', 1, 1, 'curint'}, decr = {'string', 1, 1, 'curint'},
  incrby = {'string', 2, 2, 'int@2', 'curint'}, decrby = {'string', 2, 2, 'int@2', 'curint'},
  incrbyfloat = {'string', 2, 2, 'num@2', 'curnum'},
  del = {'any', 1, 1}, unlink = {'any', 1, 1},
  expire = {'any', 2, 2, 'int@2'}, pexpire = {'any', 2, 2, 'int@2'},
  hset = {'hash', 3, -1, 'pairs@2'}, hsetnx = {'hash', 3, 3}, hdel = {'hash', 2, -1},
  hincrby = {'hash', 3, 3, 'int@3', 'hcurint@2'},
  hincrbyfloat = {'hash', 3, 3, 'num@3', 'hcurnum@2'},
  sadd = {'set', 2, -1}, srem = {'set', 2, -1},
  zadd = {'zset', 3, -1, 'pairs@2', 'zscores'}, zincrby = {'zset', 3, 3, 'num@2'},
  zrem = {'zset', 2, -1},
  lpush = {'list', 2, -1}, rpush = {'list', 2, -1}, ltrim = {'list', 3, 3, 'int@2', 'int@3'},
  xadd = {'stream', 4, -1, 'star@2', 'pairs@3'},
}
local function isint(s)
  return s ~= nil and string.len(s) <= 19 and string.match(s, '^%-?%d+$') ~= nil
end
local function isnum(s)
  local n = tonumber(s)
  return n ~= nil and n == n and n ~= math.huge and n ~= -math.huge
end
-- Returns an error text, or nil when the command will succeed. ``types`` tracks the type
-- each key has after the event's earlier commands (false = deleted).
local function check(a, b, types)
  local name = string.lower(ARGV[a])
  local spec = SPEC[name]
  if not spec then return "ERR effect command '" .. name .. "' is not supported" end
  local n = b - a
  if n < spec[2] or (spec[3] >= 0 and n > spec[3]) then
    return "ERR wrong number of arguments for '" .. name .. "' effect"
  end
  local key = ARGV[a + 1]
  local t = types[key]
  if t == nil then t = redis.call('TYPE', key).ok end
  if t == false then t = 'none' end
  if spec[1] ~= 'any' and t ~= 'none' and t ~= spec[1] then
    return 'WRONGTYPE Operation against a key holding the wrong kind of value ('
      .. name .. ' on a ' .. t .. ')'
  end
  local fresh = types[key] == nil
  for c = 4, #spec do
    local chk = spec[c]
    local what, pos = string.match(chk, '^(%a+)@?(%d*)$')
    pos = tonumber(pos)
    if what == 'int' and not isint(ARGV[a + pos]) then
      return 'ERR value is not an integer or out of range'
    elseif what == 'num' and not isnum(ARGV[a + pos]) then
      return 'ERR value is not a valid float'
    elseif what == 'star' and ARGV[a + pos] ~= '*' then
      return "ERR xadd effects take '*' as the entry id"
    elseif what == 'pairs' and (b - (a + pos) + 1) % 2 ~= 0 then
      return "ERR wrong number of arguments for '" .. name .. "' effect"
    elseif what == 'zscores' then
      for i = a + 2, b, 2 do
        if not isnum(ARGV[i]) then return 'ERR value is not a valid float' end
      end
    elseif what == 'setopts' then
      local i = a + 3
      while i <= b do
        local o = string.upper(ARGV[i])
        if o == 'EX' or o == 'PX' then
          if not isint(ARGV[i + 1]) or tonumber(ARGV[i + 1]) <= 0 then
            return 'ERR invalid expire time in set effect'
          end
          i = i + 2
        elseif o == 'NX' or o == 'XX' or o == 'KEEPTTL' then i = i + 1
        else return 'ERR syntax error in set effect' end
      end
    elseif (what == 'curint' or what == 'curnum') and fresh and t == 'string' then
      local v = redis.call('GET', key)
      if (what == 'curint' and not isint(v)) or (what == 'curnum' and not isnum(v)) then
        return 'ERR value is not an integer or out of range'
      end
    elseif (what == 'hcurint' or what == 'hcurnum') and fresh and t == 'hash' then
      local v = redis.call('HGET', key, ARGV[a + pos])
      if v and ((what == 'hcurint' and not isint(v)) or (what == 'hcurnum' and not isnum(v))) then
        return 'ERR hash value is not an integer'
      end
    end
  end
  if name == 'del' or name == 'unlink' then types[key] = false
  elseif spec[1] == 'any' then types[key] = (name == 'set') and 'string' or t
  else types[key] = spec[1] end
  return nil
end
-- Check commands given as {first, last} ARGV ranges before any is run: an error text, or nil
-- when every one will succeed.
local function verify(cmds)
  local types = {}
  for _, r in ipairs(cmds) do
    local err = check(r[1], r[2], types)
    if err then return err end
  end
  return nil
end
-- Run verified commands. An out-of-memory or read-only reply (possible only before the
-- script's first write: Redis checks memory once) aborts the whole script, so the caller
-- sends the batch again later; any other error text is returned (none is expected).
local function run(cmds)
  for _, r in ipairs(cmds) do
    local res = redis.pcall(unpack(ARGV, r[1], r[2]))
    if type(res) == 'table' and res.err then
      if string.sub(res.err, 1, 3) == 'OOM' or string.sub(res.err, 1, 8) == 'READONLY' then
        return redis.error_reply(res.err)
      end
      return res.err
    end
  end
  return nil
end
"""

# Per-key order (``Concern(ordered=True)``): the hold hash maps an event key to the origin
# entry id of its head, the entry that holds the key back; later entries of the key wait in
# the key's parked list. Releasing the head (acked or dead-lettered) hands the key to the next
# parked entry, moved to the group's retry stream at once, or clears the hold when none is
# left. Only the head releases: a resent settle finds the hold moved on and does nothing.
_RELEASE = r"""
local function release(hold, parked, retry, k, origin)
  if redis.call('HGET', hold, k) ~= origin then return 0 end
  while true do
    local m = redis.call('LPOP', parked)
    if not m then
      redis.call('HDEL', hold, k)
      return 1
    end
    local ok, f = pcall(cmsgpack.unpack, m)
    if ok and type(f) == 'table' and #f >= 2 and #f % 2 == 0 then
      local o = nil
      for j = 1, #f - 1, 2 do
        if f[j] == 'origin' then o = f[j + 1] end
      end
      if o then
        redis.call('XADD', retry, '*', unpack(f))
        redis.call('HSET', hold, k, o)
        return 2
      end
    end
  end
end
"""

# Success for a batch of entries of one stream: the entry itself decides, with no mark.
# XACK first; the handler's effects apply only when XACK removed the entry from the pending
# list (1), so a redelivery, a settle resent after a lost reply or two consumers racing after a
# steal apply them exactly once. Effects are checked before the XACK (a refused one leaves the
# entry pending and is retried or dead-lettered by the caller), and after a successful XACK
# Redis refuses no further write of the script for memory (only a script's first write is
# checked), so they apply all together. When XACK answers 0, the script tells apart an entry
# the group will deliver again (3: its id is above the group's last-delivered id: the group was
# recreated after NOGROUP, or moved back): nothing is applied now, the next delivery applies it.
# KEYS[1] stream, then parked lists. ARGV: group, (unused), index in KEYS of the hold hash and
# of the retry stream (0: no holds in this batch), then per entry: id, index of its key's
# parked list (0: releases no hold), number of effect commands, then (parked list given)
# event key and origin id, and per command: number of arguments, arguments. Per entry the
# reply holds: 1 acked (effects applied); 0 not pending any more (another settle acked it and
# applied its effects); 3 not pending, not yet delivered again; or the text of the error Redis
# gave an effect (nothing of it applied, not acked). An entry acked (1) that heads its key
# releases the hold.
SUCCEED = Lua(
    _EFFECTS
    + _RELEASE
    + r"""
local function idnum(s)
  local ms, seq = string.match(s, '^(%d+)-(%d+)$')
  return tonumber(ms or s) or 0, tonumber(seq or '0') or 0
end
local delivered = nil  -- the group's last-delivered id, read once if needed
local function undelivered(id)
  if delivered == nil then
    delivered = '0-0'
    -- The stream itself is gone (deleted, FLUSHALL): as for a recreated group, nothing is
    -- applied (the entry went with it); the reader's NOGROUP recreates stream and group.
    local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
    if groups['err'] then return true end
    for _, g in ipairs(groups) do
      local t = {}
      for j = 1, #g, 2 do t[g[j]] = g[j + 1] end
      if t['name'] == ARGV[1] then delivered = t['last-delivered-id'] end
    end
  end
  local am, as = idnum(id)
  local bm, bs = idnum(delivered)
  return am > bm or (am == bm and as > bs)
end
local group = ARGV[1]
local hold, retry = KEYS[tonumber(ARGV[3])], KEYS[tonumber(ARGV[4])]
local out, i = {}, 5
while i <= #ARGV do
  local id, rel, ncmd = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  local ek, origin
  if rel > 0 then
    ek, origin = ARGV[i], ARGV[i + 1]
    i = i + 2
  end
  local cmds = {}
  for c = 1, ncmd do
    local n = tonumber(ARGV[i])
    cmds[c] = {i + 1, i + n}
    i = i + n + 1
  end
  local status
  local err = ncmd > 0 and verify(cmds)
  if err then
    status = err
  else
    status = redis.call('XACK', KEYS[1], group, id)
    if status == 1 and ncmd > 0 then
      local e = run(cmds)
      if type(e) == 'table' then return e end
      if e then status = e end  -- cannot happen after the checks; reported if it does
    elseif status == 0 and undelivered(id) then
      status = 3
    end
  end
  if rel > 0 and status == 1 then release(hold, KEYS[rel], retry, ek, origin) end
  out[#out + 1] = status
end
return out
"""
)

# Failure of one entry: ack it, and schedule its retry or dead-letter it unless a copy of this
# settle already did (a marker per failed entry, set first: resends and a second consumer that
# ran the same entry schedule nothing more). Scheduling does not depend on the entry still
# being pending: one that left the pending list is never lost.
# KEYS[1] stream, KEYS[2] failure marker, KEYS[3] delayed zset (retry) or DLQ stream (dlq);
# for an ordered group's keyed entry also KEYS[4] hold hash, KEYS[5] its key's parked list,
# KEYS[6] retry stream, and then ARGV[5], ARGV[6] are the event key and origin id (the rest
# moves up by two). ARGV: group, id, marker ms, 'retry'|'dlq', then delay ms, member (retry)
# | field, value... A retry takes the hold of its key (or keeps it); if another entry holds
# the key, the retry is parked behind it instead. A dead letter releases the hold it had.
# Returns {acked, scheduled}: scheduled is 0 (a copy did it), 1, or 2 (parked).
FAIL = Lua(
    _RELEASE
    + r"""
local held = #KEYS >= 6
local a, ek, origin = 5, nil, nil
if held then
  ek, origin, a = ARGV[5], ARGV[6], 7
end
local first = redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3])
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if not first then return {acked, 0} end
if ARGV[4] == 'retry' then
  if held then
    local cur = redis.call('HGET', KEYS[4], ek)
    if not cur then
      redis.call('HSET', KEYS[4], ek, origin)
    elseif cur ~= origin then
      redis.call('RPUSH', KEYS[5], ARGV[a + 1])
      return {acked, 2}
    end
  end
  """
    + _NOW
    + r"""
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[a]), ARGV[a + 1])
else
  redis.call('XADD', KEYS[3], '*', unpack(ARGV, a))
  if held then release(KEYS[4], KEYS[5], KEYS[6], ek, origin) end
end
return {acked, 1}
"""
)

# Park entries of an ordered group behind the head of their key, in the order given: each is
# acked in its stream and its retry record appended to the key's parked list, while the key
# is held by another entry. Stops at the first entry whose key is not held any more (-1: run
# it and the rest in order here) or that is the head itself (-2). KEYS[1] hold hash, KEYS[2]
# the key's parked list, KEYS[3..] streams. ARGV: group, event key, then per entry: index of
# its stream in KEYS, id, origin id, retry record. Returns per entry handled: 1 parked, 0 not
# pending any more (a resent park, or another consumer took it), then -1 or -2 if it stopped.
PARK = Lua(
    r"""
local cur = redis.call('HGET', KEYS[1], ARGV[2])
local out = {}
for i = 3, #ARGV, 4 do
  if not cur then
    out[#out + 1] = -1
    return out
  end
  if cur == ARGV[i + 2] then
    out[#out + 1] = -2
    return out
  end
  local acked = redis.call('XACK', KEYS[tonumber(ARGV[i])], ARGV[1], ARGV[i + 1])
  if acked == 1 then redis.call('RPUSH', KEYS[2], ARGV[i + 3]) end
  out[#out + 1] = acked
end
return out
"""
)

# Move due retries from the delayed zset to the group's retry stream (members are msgpack
# lists of field, value; older JSON members are still read). A member that is neither goes to
# the DLQ with the reason 'bad_retry_record'. KEYS[1] delayed zset, KEYS[2] retry stream,
# KEYS[3] DLQ. ARGV: limit. Returns {moved, ms until the next one is due or -1}.
PUMP = Lua(
    _NOW
    + r"""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])
for _, m in ipairs(due) do
  local ok, f = pcall(cmsgpack.unpack, m)
  if not ok or type(f) ~= 'table' then ok, f = pcall(cjson.decode, m) end
  if ok and type(f) == 'table' and #f >= 2 and #f % 2 == 0 then
    redis.call('XADD', KEYS[2], '*', unpack(f))
  else
    redis.call('XADD', KEYS[3], '*', 'dlq_reason', 'bad_retry_record', 'raw', m)
  end
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = -1
if nxt[2] then wait = math.max(0, tonumber(nxt[2]) - now) end
return {#due, wait}
"""
)

# The group's upkeep clock (a hash): 'tick' = when a consumer last renewed (Redis' time),
# 'outage_end' = when a gap longer than the allowed one ended (Redis was stopped, stalled or
# unreachable for every consumer). Renewing and reclaiming both look at it.
_TICK_READ = (
    _NOW
    + r"""
local last = tonumber(redis.call('HGET', KEYS[2], 'tick') or '0')
local gap = last > 0 and now - last > tonumber(ARGV[3])
"""
)
# Writes come after the step's own command, and may fail: under maxmemory Redis refuses a
# script's first write if it is an HSET, while XCLAIM / XAUTOCLAIM are allowed, so renewing
# goes on during OOM. A clock that could not tick reads as an outage afterwards (no reclaim
# until owners renewed), which is what it was.
_TICK_WRITE = r"""
if gap then redis.pcall('HSET', KEYS[2], 'outage_end', now) end
redis.pcall('HSET', KEYS[2], 'tick', now)
redis.pcall('PEXPIRE', KEYS[2], 86400000)
"""

# Renew the entries this consumer holds and still owns (XCLAIM JUSTID with min-idle 0 resets
# their idle time without counting a delivery); entries now owned by another consumer (or gone
# from the pending list) are not taken back. An entry whose payload was cut from the stream
# (a hard cap) is left as it is: XCLAIM would drop it from the pending list, and then the
# settle's XACK, which decides whether the effects apply, would find nothing and apply none.
# It stays pending, owned by this live consumer, until its settle. KEYS[1] stream, KEYS[2]
# upkeep hash.
# ARGV: group, consumer, allowed gap ms, ids... Returns the ids another consumer owns now.
RENEW = Lua(
    _TICK_READ
    + r"""
local keep, lost = {}, {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] then
    if p[1][2] ~= ARGV[2] then
      lost[#lost + 1] = ARGV[i]
    elseif #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) == 1 then
      keep[#keep + 1] = ARGV[i]
    end
  end  -- not pending: acked by a settle whose reply is on its way
end
for s = 1, #keep, 500 do
  local last = math.min(s + 499, #keep)
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(keep, s, last), 'JUSTID')
end
"""
    + _TICK_WRITE
    + "return lost\n"
)

# Reclaim entries whose owner stopped: pending longer than min-idle AND owned by a consumer
# that has not touched Redis for min-idle (XINFO CONSUMERS ``idle``: a live owner reads and
# renews every few hundred ms, so an entry whose reply or renewal was merely late is never
# taken from it). Like XAUTOCLAIM, with the owner check, from a cursor kept by the caller.
# Nothing is claimed while the group's clock shows an outage that ended less than ``quiet``
# ago (after an outage every consumer looks idle: owners first get a renewal period).
# KEYS[1] stream, KEYS[2] upkeep hash. ARGV: group, consumer, allowed gap ms, min idle ms,
# cursor ('0-0' or '(<id>'), count, quiet ms. Returns {'wait'} or {next cursor, entries}.
RECLAIM = Lua(
    _TICK_READ
    + r"""
local oe = tonumber(redis.call('HGET', KEYS[2], 'outage_end') or '0')
local reply = {'wait'}
if not gap and now - oe >= tonumber(ARGV[7]) then
  local min_idle, want = tonumber(ARGV[4]), tonumber(ARGV[6])
  local alive = {}
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local t = {}
    for i = 1, #c, 2 do t[c[i]] = c[i + 1] end
    if tonumber(t['idle']) < min_idle then alive[t['name']] = true end
  end
  alive[ARGV[2]] = true  -- our own entries come back through our own pending list
  local start = ARGV[5]
  if start == '0-0' then start = '-' end
  local scan = want * 10
  local rows = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', min_idle, start, '+', scan)
  local ids, cursor = {}, '0-0'
  for n, r in ipairs(rows) do
    if not alive[r[2]] then
      ids[#ids + 1] = r[1]
      if #ids >= want then
        if n < #rows or #rows == scan then cursor = '(' .. r[1] end
        break
      end
    end
  end
  if #ids < want and #rows == scan then cursor = '(' .. rows[#rows][1] end
  local claimed = {}
  if #ids > 0 then
    claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], min_idle, unpack(ids))
  end
  reply = {cursor, claimed}
end
"""
    + _TICK_WRITE
    + "return reply\n"
)

# Remove consumers that own nothing and were idle longer than the expiry, in one step with the
# check (a consumer that reads between a separate check and DELCONSUMER would lose entries).
# KEYS[1] stream. ARGV: group, this consumer, expiry ms. Returns the names removed.
EXPIRE_CONSUMERS = Lua(
    r"""
local out = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local t = {}
  for i = 1, #c, 2 do t[c[i]] = c[i + 1] end
  local idle = tonumber(t['idle']) > tonumber(ARGV[3])
  if t['name'] ~= ARGV[2] and tonumber(t['pending']) == 0 and idle then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], t['name'])
    out[#out + 1] = t['name']
  end
end
return out
"""
)

# Claim (or keep) this consumer's name in the group while alive. KEYS[1] claim key.
# ARGV: token, ttl ms. Returns 1 when the name is ours now, 0 when another live process has it.
CLAIM_NAME = Lua(
    r"""
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
)

# Let go of the name. KEYS[1] claim key. ARGV: token.
RELEASE_NAME = Lua(
    r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
)

# At a graceful stop, give back the deliveries of entries cut off by the grace period: they
# ended cleanly, so their next delivery must not count toward max_deliveries. Only entries
# still ours. KEYS[1] stream. ARGV: group, consumer, then id, count pairs. Returns how many.
UNCOUNT = Lua(
    r"""
local n = 0
for i = 3, #ARGV, 2 do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    n = n + 1
  end
end
return n
"""
)
