"""Limit counters shared by every gateway process and machine, in Redis (`[limits] store = "redis://..."`).

Reserve (check every applicable counter, then add to all of them, or refuse), settle and seed are
each one Lua script (`redis_scripts`), so two gateways can never both take the last of a budget.
Window starts come from the Redis server's clock. Money is integer nano-dollars, as in memory.

Fail closed: when Redis cannot be reached a request is refused with `LimitStoreUnavailable` (503 in the
route's format) rather than served past its limits; every call tries again, so service resumes as soon
as Redis answers. Redis that comes back empty (restarted without persistence, flushed) has lost the
counters: the first reservation finds this process's seed marker gone and re-seeds from its events
(single-flight), and the marker (SET NX) makes that happen once per event source, never twice.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy.errors import LimitStoreUnavailable
from proxy.limits import (
    METRICS,
    WINDOWS,
    Amounts,
    Check,
    Denied,
    Reservation,
    Scope,
    SeedRow,
    from_units,
    pick_denial,
    vector,
    window_end,
    window_start,
)
from proxy.stores import redis_scripts
from proxy.stores.redis_keys import RedisKeyShare

log = logging.getLogger("tollway.limits")
GRACE_S = 120  # counters outlive their window this long, for requests that settle late
_W = {w: i + 1 for i, w in enumerate(WINDOWS)}
_M = {m: i for i, m in enumerate(METRICS)}
UNAVAILABLE = ("Tollway cannot check this request's limits right now (its shared limit store, Redis, does not "
               "answer) and refuses it rather than serve past a budget. Retry shortly; operators: see /readyz.")


def connect(url: str) -> redis.Redis:
    """A client that fails fast: a limit check is normally well under a millisecond, and a request must
    not hang on a dead Redis. One immediate retry on a broken connection (after a Redis restart the
    pooled connections are dead); none on a timeout, which might have run the script already."""
    return redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0, retry_on_timeout=False,
                                retry=Retry(NoBackoff(), 1, (RedisConnectionError,)), max_connections=256)


def _epoch(at: datetime) -> int:
    return int(at.timestamp())


def _at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class RedisLimitStore:
    def __init__(self, url: str, prefix: str = "tollway") -> None:
        self.url = url
        self.redis = connect(url)
        self._prefix = prefix
        self._reserve = self.redis.register_script(redis_scripts.RESERVE)
        self._settle_script = self.redis.register_script(redis_scripts.SETTLE)
        self._seed = self.redis.register_script(redis_scripts.SEED)
        self.source = "default"
        self._reseed: Callable[[], Awaitable[None]] | None = None
        self._reseeding = asyncio.Lock()
        self.last_error: str | None = None

    def attach(self, source: str, reseed: Callable[[], Awaitable[None]] | None) -> None:
        """`source` names the event store this process seeds from; `reseed` re-reads it into `seed`."""
        self.source, self._reseed = source, reseed

    def _marker(self) -> str:
        return f"{self._prefix}:seeded:{self.source}"

    def _scope_key(self, scope: Scope) -> str:
        return f"{self._prefix}:c:{scope.tenant}:{scope.user or '-'}"

    async def _call(self, script, keys: list[str], args: list) -> object:
        try:
            result = await script(keys=keys, args=args)
        except RedisError as exc:
            if self.last_error is None:
                log.error("limit store %s unreachable, refusing requests until it answers: %s", self.url, exc)
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise LimitStoreUnavailable(UNAVAILABLE, retry_after=1) from exc
        if self.last_error is not None:
            log.warning("limit store %s answers again", self.url)
            self.last_error = None
        return result

    async def reserve(self, checks: list[Check], scopes: tuple[Scope, ...], amounts: Amounts,
                      at: datetime) -> Reservation | Denied:
        wanted = vector(amounts)
        args = [*wanted, GRACE_S]
        for check in checks:
            args += [1 if check.scope.user is None else 2, _M[check.metric], _W[check.window], check.limit]
        keys = [self._marker(), *(self._scope_key(s) for s in scopes)]
        reply = await self._call(self._reserve, keys, args)
        if reply[0] == -1:  # Redis lost its counters: put this source's usage back first, once
            await self._reseed_once()
            reply = await self._call(self._reserve, keys, args)
            if reply[0] == -1:
                raise LimitStoreUnavailable(UNAVAILABLE, retry_after=1)
        now = _at(int(reply[1])) + timedelta(microseconds=int(reply[2]))
        starts = tuple(_at(int(s)) for s in reply[4:8])
        if reply[0] == 0:
            over = [(int(reply[i]), int(reply[i + 1])) for i in range(8, len(reply), 2)]
            return pick_denial(checks, over, starts, now)
        gen = reply[3].decode() if isinstance(reply[3], bytes) else str(reply[3])
        return Reservation(now, scopes, amounts, starts, gen)

    async def _reseed_once(self) -> None:
        async with self._reseeding:  # single-flight: the waiters find the marker set
            if await self._call_raw(lambda: self.redis.exists(self._marker())):
                return
            if self._reseed is None:
                await self.seed(self.source, [])
                return
            log.warning("limit store %s has no counters for %s: re-seeding them from the events", self.url,
                        self.source)
            await self._reseed()

    async def _call_raw(self, command: Callable[[], Awaitable]) -> object:
        try:
            return await command()
        except RedisError as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise LimitStoreUnavailable(UNAVAILABLE, retry_after=1) from exc

    async def settle(self, reservation: Reservation, actual: Amounts) -> dict[tuple[Scope, str], int]:
        return await self._settle(reservation, vector(actual))

    async def release(self, reservation: Reservation) -> None:
        await self._settle(reservation, [0] * len(METRICS))

    async def _settle(self, reservation: Reservation, actual: list[int]) -> dict[tuple[Scope, str], int]:
        starts = reservation.starts
        expire = [_epoch(window_end(w, s)) + GRACE_S for w, s in zip(WINDOWS, starts, strict=True)]
        args = [reservation.generation or "", *(_epoch(s) for s in starts), *expire,
                *(-v for v in vector(reservation.amounts)), *actual]
        keys = [self._marker(), *(self._scope_key(s) for s in reservation.scopes)]
        reply = await self._call(self._settle_script, keys, args)
        if not reply:
            return {}
        return {(scope, window): int(reply[s * 4 + w])
                for s, scope in enumerate(reservation.scopes) for w, window in enumerate(WINDOWS)}

    async def spent(self, scope: Scope, metric: str, window: str, at: datetime) -> Decimal:
        key = f"{self._scope_key(scope)}:{_W[window]}:{_epoch(window_start(window, at))}"
        value = await self._call_raw(lambda: self.redis.hget(key, f"u{_M[metric]}"))
        return from_units(metric, int(value or 0))

    async def seed(self, source: str, rows: list[SeedRow]) -> bool:
        args: list = [secrets.token_hex(8)]
        for row in rows:
            expire = _epoch(window_end(row.window, row.start)) + GRACE_S
            args += [self._scope_key(row.scope), _W[row.window], _epoch(row.start), expire,
                     row.requests, row.tokens, row.usd]
        seeded = bool(await self._call(self._seed, [f"{self._prefix}:seeded:{source}"], args))
        if seeded:
            log.info("limit store seeded from %s: %d (scope, window) figures", source, len(rows))
        return seeded

    async def first_alert(self, key: str, until: datetime) -> bool:
        expire = _epoch(until) + 86_400
        name = f"{self._prefix}:alert:{key}"
        return bool(await self._call_raw(lambda: self.redis.set(name, 1, nx=True, exat=expire)))

    def key_share(self) -> RedisKeyShare:
        """Provider-key health shared through the same Redis."""
        return RedisKeyShare(self.redis, self._prefix)

    async def check(self) -> str:
        """One PING with a short deadline (for /readyz)."""
        try:
            await asyncio.wait_for(self.redis.ping(), 1.0)
        except (RedisError, TimeoutError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return f"redis {self.url} unreachable: {self.last_error}"
        return "ok"

    async def close(self) -> None:
        await self.redis.aclose()
