"""Provider-key health shared through Redis: 429 cool-downs and 401 strikes seen by one gateway process
apply in every other (`proxy.keys.KeyShare`).

A cool-down is written to the hash P:cool (key id -> end, server milliseconds) and published on the
channel P:keys; every process subscribes, applies it to its in-memory view (the request path never
waits for Redis to pick a key), and loads the hash again after each (re)subscription, so a process
that starts or reconnects late still rests the key. Strikes are one counter per key expiring after
the strike window. Sharing is best effort: with Redis down, each process still honours what it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

import redis.asyncio as redis
from redis.exceptions import RedisError

log = logging.getLogger("tollway.gateway")

_COOL = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(ARGV[2])
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if now + ms > old then redis.call('HSET', KEYS[1], ARGV[1], now + ms) end
redis.call('PEXPIRE', KEYS[1], 3600000)
redis.call('PUBLISH', KEYS[2], cjson.encode({op = 'cool', key = ARGV[1], ms = ms}))
"""
_STRIKE = r"""
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
redis.call('PUBLISH', KEYS[2], cjson.encode({op = 'strike', key = ARGV[1]}))
return n
"""
_COOLING = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local left = tonumber(all[i + 1]) - now
  if left > 0 then out[#out + 1] = all[i]; out[#out + 1] = left else redis.call('HDEL', KEYS[1], all[i]) end
end
return out
"""


class RedisKeyShare:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._redis = client
        self._cool_key, self._channel = f"{prefix}:cool", f"{prefix}:keys"
        self._strikes = f"{prefix}:strikes:"
        self._cool = client.register_script(_COOL)
        self._strike = client.register_script(_STRIKE)
        self._cooling = client.register_script(_COOLING)
        self._task: asyncio.Task | None = None
        self.subscribed = asyncio.Event()

    async def start(self, cooled: Callable[[str, float], None], failing: Callable[[str, str], None],
                    struck: Callable[[str], None]) -> None:
        handlers = {"cool": lambda m: cooled(m["key"], m["ms"] / 1000),
                    "failing": lambda m: failing(m["key"], m["reason"]), "strike": lambda m: struck(m["key"])}
        self._task = asyncio.get_running_loop().create_task(self._listen(handlers, cooled), name="key-share")

    async def _listen(self, handlers: dict, cooled: Callable[[str, float], None]) -> None:
        """Subscribe, catch up on the cool-downs in force, apply messages; again after a lost connection."""
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                found = await self._cooling(keys=[self._cool_key])
                for i in range(0, len(found), 2):
                    cooled(found[i].decode(), int(found[i + 1]) / 1000)
                self.subscribed.set()
                async for message in pubsub.listen():
                    self._apply(handlers, message)
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.debug("key health subscription lost (%s); resubscribing", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    @staticmethod
    def _apply(handlers: dict, message: dict) -> None:
        try:
            data = json.loads(message["data"])
            handlers[data["op"]](data)
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("ignored a malformed key health message: %s", exc)

    async def cool_down(self, key_id: str, seconds: float) -> None:
        await self._cool(keys=[self._cool_key, self._channel], args=[key_id, int(seconds * 1000)])

    async def strike(self, key_id: str, window_s: float) -> int:
        return int(await self._strike(keys=[self._strikes + key_id, self._channel], args=[key_id, int(window_s)]))

    async def clear_strikes(self, key_id: str) -> None:
        await self._redis.delete(self._strikes + key_id)

    async def failing(self, key_id: str, reason: str) -> None:
        await self._redis.publish(self._channel, json.dumps({"op": "failing", "key": key_id, "reason": reason}))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
