"""The Lua scripts of the Redis limit store. Each runs atomically on the server, touches every key of
one request in one call, takes the window starts from the server's `TIME` (so every gateway agrees
on them whatever its clock), and sets each counter to expire after its window.

Keys (P = the store's prefix, S = a scope: `tenant:user-pseudonym`, `-` for the tenant as a whole):
    P:c:S:W:START   hash, one per scope, window (1 minute, 2 hour, 3 day, 4 month, UTC) and window
                    start (epoch seconds): u0 u1 u2 used and r0 r1 r2 reserved requests, tokens,
                    nano-dollars
    P:seeded:SRC    the counter generation seeded from event source SRC (no TTL): absent means Redis
                    lost its data (or never had it) and SRC's usage must be added before anyone reserves
Amounts are passed as decimal strings and added with HINCRBY, so money stays exact integers.
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
-- calendar windows (UTC) containing `now`: starts and ends, epoch seconds
local function windows(now)
  local day = math.floor(now / 86400)
  local y, m = civil_from_days(day)
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  local minute, hour = now - now % 60, now - now % 3600
  return {minute, hour, day * 86400, days_from_civil(y, m, 1) * 86400},
         {minute + 60, hour + 3600, day * 86400 + 86400, days_from_civil(ny, nm, 1) * 86400}
end
"""

#: KEYS: seeded marker, tenant scope prefix, user scope prefix. ARGV: wanted requests, tokens, usd; grace
#: seconds; then per check: scope (1 tenant, 2 user), metric (0-2), window (1-4), limit.
#: Returns {-1} unseeded; {0, sec, usec, gen, s1..s4, index, used, ...} denied; {1, sec, usec, gen, s1..s4}.
RESERVE = _WINDOWS + r"""
local gen = redis.call('GET', KEYS[1])
if not gen then return {-1} end
local t = redis.call('TIME')
local now = tonumber(t[1])
local starts, ends = windows(now)
local want = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])}
local grace = tonumber(ARGV[4])
local over = {}
local i = 0
for b = 5, #ARGV, 4 do
  local w = tonumber(ARGV[b + 2])
  local m = ARGV[b + 1]
  local key = KEYS[1 + tonumber(ARGV[b])] .. ':' .. w .. ':' .. starts[w]
  local v = redis.call('HMGET', key, 'u' .. m, 'r' .. m)
  local current = (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0)
  if current + want[tonumber(m) + 1] > tonumber(ARGV[b + 3]) then
    over[#over + 1] = i
    over[#over + 1] = current
  end
  i = i + 1
end
local head = {#over > 0 and 0 or 1, t[1], t[2], gen, starts[1], starts[2], starts[3], starts[4]}
if #over > 0 then
  for _, v in ipairs(over) do head[#head + 1] = v end
  return head
end
for s = 2, 3 do
  for w = 1, 4 do
    local key = KEYS[s] .. ':' .. w .. ':' .. starts[w]
    for m = 0, 2 do
      if want[m + 1] ~= 0 then redis.call('HINCRBY', key, 'r' .. m, ARGV[m + 1]) end
    end
    redis.call('EXPIREAT', key, ends[w] + grace)
  end
end
return head
"""

#: KEYS: seeded marker, tenant prefix, user prefix. ARGV: generation, s1..s4, expire-at 1..4, minus the
#: reserved requests, tokens, usd, then the actual requests, tokens, usd.
#: Returns the used usd of {tenant w1..w4, user w1..w4}, or {} when Redis lost the counters since (the
#: next seed counts this request from its event).
SETTLE = r"""
local gen = redis.call('GET', KEYS[1])
if not gen then return {} end
local same = gen == ARGV[1]
local out = {}
for s = 2, 3 do
  for w = 1, 4 do
    local key = KEYS[s] .. ':' .. w .. ':' .. ARGV[1 + w]
    for m = 0, 2 do
      if same and ARGV[10 + m] ~= '0' then redis.call('HINCRBY', key, 'r' .. m, ARGV[10 + m]) end
      if ARGV[13 + m] ~= '0' then redis.call('HINCRBY', key, 'u' .. m, ARGV[13 + m]) end
    end
    redis.call('EXPIREAT', key, ARGV[5 + w])
    out[#out + 1] = tonumber(redis.call('HGET', key, 'u2') or '0')
  end
end
return out
"""

#: KEYS: seeded marker. ARGV: new generation, then per row: scope prefix, window (1-4), start, expire-at,
#: requests, tokens, usd. Adds the rows only if the marker was absent (SET NX): never twice.
SEED = r"""
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return 0 end
for b = 2, #ARGV, 7 do
  local key = ARGV[b] .. ':' .. ARGV[b + 1] .. ':' .. ARGV[b + 2]
  for m = 0, 2 do
    if ARGV[b + 4 + m] ~= '0' then redis.call('HINCRBY', key, 'u' .. m, ARGV[b + 4 + m]) end
  end
  redis.call('EXPIREAT', key, ARGV[b + 3])
end
return 1
"""
