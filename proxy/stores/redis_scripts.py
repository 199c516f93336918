"""The Lua scripts of the Redis limit store. Each runs atomically on the server, touches every key of
one request in one call, takes the window starts from the server's `TIME` (so every gateway agrees
on them whatever its clock), and sets each counter to expire after its window.

Keys (P = the store's prefix, S = a scope: `tenant:user-pseudonym`, `-` for the tenant as a whole):
    P:c:S:W:START   hash, one per scope, window (1 minute, 2 hour, 3 day, 4 month, UTC) and window
                    start (epoch seconds): u0 u1 u2 used (settled) requests, tokens, nano-dollars, in
                    every window of both scopes (so a limit added later starts from the real figures),
                    and h0 h1 h2 the same reserved by requests in flight, only in the counters a limit
                    checks (a check is u + h; a request holds 4 counters for 4 limits, not all 24)
    P:seeded:SRC    the counter generation seeded from event source SRC (no TTL): absent means Redis
                    lost its data (or never had it) and SRC's usage must be added before anyone reserves
Amounts are passed as decimal strings and added with HINCRBY, so money stays exact integers.

Every `redis.call` costs about a microsecond of the server's single thread, so the scripts make as few
as they can: field names are constants, key names are built once per call, and a counter's EXPIREAT is
set only when the script finds the fields it uses absent (the key may just have been created; its
expiry never changes afterwards), not on every call.
"""

_WINDOWS = r"""
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
-- calendar windows (UTC) containing `now`: starts and ends, epoch seconds. The caller's month (`month`
-- to `month_end`, from its own calendar) is used when `now` falls in it, which saves the calendar
-- arithmetic on all but the calls near a month's turn on a drifting clock.
local function windows(now, month, month_end)
  local day = math.floor(now / 86400)
  local minute, hour = now - now % 60, now - now % 3600
  if not (month and month <= now and now < month_end) then
    local y, m = civil_from_days(day)
    local ny, nm = y, m + 1
    if nm > 12 then ny, nm = y + 1, 1 end
    month, month_end = days_from_civil(y, m, 1) * 86400, days_from_civil(ny, nm, 1) * 86400
  end
  return {minute, hour, day * 86400, month}, {minute + 60, hour + 3600, day * 86400 + 86400, month_end}
end
-- the end of window w (1-4) starting at `start`
local function window_end(w, start)
  if w == 1 then return start + 60 elseif w == 2 then return start + 3600 elseif w == 3 then return start + 86400 end
  local y, m = civil_from_days(math.floor(start / 86400))
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  return days_from_civil(y, m, 1) * 86400
end
local U, H = {'u0', 'u1', 'u2'}, {'h0', 'h1', 'h2'}
"""

#: KEYS: seeded marker, tenant scope prefix, user scope prefix. ARGV: wanted requests, tokens, usd; grace
#: seconds; the caller's month start and end (epoch seconds: a hint, used if the server's time is in it);
#: then per check: scope (1 tenant, 2 user), metric (0-2), window (1-4), limit.
#: Returns {-1} unseeded; {0, sec, usec, gen, s1..s4, index, held, ...} denied; {1, sec, usec, gen, s1..s4}.
#: Only the checked counters are read and held: a check is `u + h + wanted <= limit` (one HMGET).
RESERVE = _WINDOWS + r"""
local gen = redis.call('GET', KEYS[1])
if not gen then return {-1} end
local t = redis.call('TIME')
local starts, ends = windows(tonumber(t[1]), tonumber(ARGV[5]), tonumber(ARGV[6]))
local want = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])}
local keys, fresh = {}, {}
local over = {}
local i = 0
for b = 7, #ARGV, 4 do
  local w, m = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 1]) + 1
  local key = KEYS[tonumber(ARGV[b]) + 1] .. ':' .. w .. ':' .. starts[w]
  local f = redis.call('HMGET', key, U[m], H[m])
  keys[#keys + 1] = key
  fresh[#fresh + 1] = not f[1] and not f[2]  -- the counter was never used in this window: set its expiry
  local used = (tonumber(f[1]) or 0) + (tonumber(f[2]) or 0)
  if used + want[m] > tonumber(ARGV[b + 3]) then
    over[#over + 1] = i
    over[#over + 1] = used
  end
  i = i + 1
end
local head = {#over > 0 and 0 or 1, t[1], t[2], gen, starts[1], starts[2], starts[3], starts[4]}
if #over > 0 then
  for _, v in ipairs(over) do head[#head + 1] = v end
  return head
end
local grace = tonumber(ARGV[4])
local c = 0
for b = 7, #ARGV, 4 do
  c = c + 1
  local m = tonumber(ARGV[b + 1]) + 1
  if want[m] ~= 0 then
    redis.call('HINCRBY', keys[c], H[m], ARGV[m])
    if fresh[c] then redis.call('EXPIREAT', keys[c], ends[tonumber(ARGV[b + 2])] + grace) end
  end
end
return head
"""

#: KEYS: seeded marker, tenant prefix, user prefix. ARGV: generation, s1..s4, then minus the reserved
#: requests, tokens, usd, then the actual requests, tokens, usd, then grace seconds, then per counter the
#: reservation holds: scope (1 tenant, 2 user), metric (0-2), window (1-4).
#: Returns the used usd of {tenant w1..w4, user w1..w4} when the actual usd is not 0, else {}; {} also
#: when Redis lost the counters since (the next seed counts this request from its event). A reservation
#: made in an earlier generation (Redis lost it meanwhile) holds nothing any more: only its actual
#: figures are added.
SETTLE = _WINDOWS + r"""
local gen = redis.call('GET', KEYS[1])
if not gen then return {} end
local grace = tonumber(ARGV[12])
if gen == ARGV[1] then
  for b = 13, #ARGV, 3 do
    local m, w = tonumber(ARGV[b + 1]) + 1, tonumber(ARGV[b + 2])
    local d = ARGV[5 + m]
    if d ~= '0' then
      local key = KEYS[tonumber(ARGV[b]) + 1] .. ':' .. w .. ':' .. ARGV[1 + w]
      if redis.call('HINCRBY', key, H[m], d) == tonumber(d) then
        redis.call('EXPIREAT', key, window_end(w, tonumber(ARGV[1 + w])) + grace)
      end
    end
  end
end
local out = {}
for s = 2, 3 do
  local prefix = KEYS[s] .. ':'
  for w = 1, 4 do
    local key = prefix .. w .. ':' .. ARGV[1 + w]
    local fresh = nil
    for m = 1, 3 do
      local a = ARGV[8 + m]
      if a ~= '0' then
        local v = redis.call('HINCRBY', key, U[m], a)
        if fresh == nil then fresh = v == tonumber(a) end
        if m == 3 then out[#out + 1] = v end
      end
    end
    if fresh then redis.call('EXPIREAT', key, window_end(w, tonumber(ARGV[1 + w])) + grace) end
  end
end
return out
"""

#: KEYS: seeded marker. ARGV: new generation, then per row: scope prefix, window (1-4), start, expire-at,
#: requests, tokens, usd. Adds the rows (used) only if the marker was absent (SET NX): never twice.
SEED = r"""
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return 0 end
local U = {'u0', 'u1', 'u2'}
for b = 2, #ARGV, 7 do
  local key = ARGV[b] .. ':' .. ARGV[b + 1] .. ':' .. ARGV[b + 2]
  for m = 1, 3 do
    local v = ARGV[b + 3 + m]
    if v ~= '0' then redis.call('HINCRBY', key, U[m], v) end
  end
  redis.call('EXPIREAT', key, ARGV[b + 3])
end
return 1
"""
