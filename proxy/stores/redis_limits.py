"""Limit counters shared by every gateway process and machine, in Redis (`[limits] store = "redis://..."`).

Reserve (check every applicable counter, then hold the request's worst case in all of them, or refuse),
settle and seed are each one Lua script (`redis_scripts`), so two gateways can never both take the last
of a budget. Only the counters a limit checks hold reservations; used figures are counted everywhere.
Window starts come from the Redis server's clock. Money is integer nano-dollars, as in memory.
A request costs two commands (reserve, settle: one EVALSHA each), sent over one pipelined connection
(`redis_pipe`) with the other commands of the same turn of the event loop.

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
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

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
from proxy.stores.redis_pipe import AutoPipeline, RedisReplyError, RedisUnavailable, Script
from proxy.stores.redis_sentinel import SCHEME as SENTINEL_SCHEME
from proxy.stores.redis_sentinel import parse_sentinel_url

log = logging.getLogger("tollway.limits")
GRACE_S = 120  # counters outlive their window this long, for requests that settle late
RESEED_RETRY_S = 1.0  # after a failed re-seed, requests are refused this long before the next try
_W = {w: i + 1 for i, w in enumerate(WINDOWS)}
_M = {m: i for i, m in enumerate(METRICS)}
RESEED_FAILED = ("Tollway cannot check this request's limits right now: its shared limit store (Redis) lost its "
                 "counters and reading the usage so far back from the events failed, so it refuses the request "
                 "rather than serve past a budget. Retry shortly; operators: see /readyz and the gateway log.")
UNAVAILABLE = ("Tollway cannot check this request's limits right now (its shared limit store, Redis, does not "
               "answer) and refuses it rather than serve past a budget. Retry shortly; operators: see /readyz.")


def connect(url: str) -> redis.Redis:
    """A redis-py client for what is not on a request's path (key health's publish and subscribe): fails
    fast, one immediate retry on a broken connection, none on a timeout. Behind Sentinel, redis-py asks it
    for the master at each connection."""
    options = {"socket_connect_timeout": 0.5, "socket_timeout": 1.0, "retry_on_timeout": False,
               "retry": Retry(NoBackoff(), 1, (RedisConnectionError,))}
    if not url.startswith(SENTINEL_SCHEME):
        return redis.Redis.from_url(url, max_connections=64, **options)
    from redis.asyncio.sentinel import Sentinel

    target = parse_sentinel_url(url)
    sentinel = Sentinel(list(target.sentinels), socket_connect_timeout=0.5, socket_timeout=1.0)
    return sentinel.master_for(target.service, db=target.db, username=target.username, password=target.password,
                               **options)


def _at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def shown(url: str) -> str:
    """The URL for messages, /readyz and logs: a password in it replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


class RedisLimitStore:
    def __init__(self, url: str, prefix: str = "tollway") -> None:
        self.url = url
        self.shown = shown(url)
        # Every limit-store call goes over one pipelined connection (see redis_pipe): a request's
        # reserve and settle are one EVALSHA each, written together with whatever else is issued in the
        # same turn of the event loop.
        self.pipe = AutoPipeline(url, connect_timeout=0.5, reply_timeout=1.0)
        self._redis: redis.Redis | None = None
        self._prefix = prefix
        self._reserve = Script(self.pipe, redis_scripts.RESERVE)
        self._settle_script = Script(self.pipe, redis_scripts.SETTLE)
        self._seed = Script(self.pipe, redis_scripts.SEED)
        self.source = "default"
        self._marker_key = self._marker()
        self._reseed: Callable[[], Awaitable[None]] | None = None
        self._reseeding = asyncio.Lock()
        self.last_error: str | None = None
        self.reseed_error: str | None = None  # why the last re-seed failed, until one succeeds
        self._observe: Callable[[str, float], None] | None = None
        self._reseed_failed_at = 0.0
        self._scope_keys: dict[Scope, str] = {}
        self._starts: dict[tuple, tuple[tuple[datetime, ...], tuple[int, ...]]] = {}
        self._epochs: dict[tuple[datetime, ...], tuple[int, ...]] = {}
        self._month: tuple = (datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC), 0, 0)

    @property
    def redis(self) -> redis.Redis:
        """A redis-py client on the same server (created on first use: key health sharing)."""
        if self._redis is None:
            self._redis = connect(self.url)
        return self._redis

    def attach(self, source: str, reseed: Callable[[], Awaitable[None]] | None) -> None:
        """`source` names the event store this process seeds from; `reseed` re-reads it into `seed`."""
        self.source, self._reseed = source, reseed
        self._marker_key = self._marker()

    def _marker(self) -> str:
        return f"{self._prefix}:seeded:{self.source}"

    def _scope_key(self, scope: Scope) -> str:
        key = self._scope_keys.get(scope)
        if key is None:
            if len(self._scope_keys) > 100_000:
                self._scope_keys.clear()
            key = self._scope_keys[scope] = f"{self._prefix}:c:{scope.tenant}:{scope.user or '-'}"
        return key

    def _unavailable(self, exc: Exception) -> LimitStoreUnavailable:
        if self.last_error is None:
            log.error("limit store %s unreachable, refusing requests until it answers: %s", self.shown, exc)
        self.last_error = f"{type(exc).__name__}: {exc}"
        return LimitStoreUnavailable(UNAVAILABLE, retry_after=1)

    async def _call(self, script: Script, keys: list, args: list) -> object:
        try:
            result = await script(keys, args)
        except (RedisUnavailable, RedisReplyError) as exc:
            raise self._unavailable(exc) from exc
        if self.last_error is not None:
            log.warning("limit store %s answers again", self.shown)
            self.last_error = None
        return result

    async def _command(self, *args) -> object:
        try:
            return await self.pipe.send(*args)
        except (RedisUnavailable, RedisReplyError) as exc:
            raise self._unavailable(exc) from exc

    def _windows(self, reply: list) -> tuple[datetime, ...]:
        """The window starts of a reserve reply (shared by every reservation of the same minute)."""
        raw = (reply[4], reply[5], reply[6], reply[7])
        found = self._starts.get(raw)
        if found is None:
            if len(self._starts) > 64:
                self._starts.clear()
                self._epochs.clear()
            epochs = tuple(int(s) for s in raw)
            starts = tuple(_at(s) for s in epochs)
            found = self._starts[raw] = (starts, epochs)
            self._epochs[starts] = epochs
        return found[0]

    def _epochs_of(self, starts: tuple[datetime, ...]) -> tuple[int, ...]:
        epochs = self._epochs.get(starts)
        return epochs if epochs is not None else tuple(int(s.timestamp()) for s in starts)

    def _month_of(self, at: datetime) -> tuple[int, int]:
        """The month window containing `at` by this machine's calendar, as epoch seconds (a hint for the
        reserve script, which checks it against the server's time)."""
        month = self._month
        if not month[0] <= at < month[1]:
            start = window_start("month", at)
            end = window_end("month", start)
            month = self._month = (start, end, int(start.timestamp()), int(end.timestamp()))
        return month[2], month[3]

    async def reserve(self, checks: list[Check], scopes: tuple[Scope, ...], amounts: Amounts,
                      at: datetime) -> Reservation | Denied:
        args = [*vector(amounts), GRACE_S, *self._month_of(at)]
        holds: list = []
        for check in checks:
            counter = (1 if check.scope.user is None else 2, _M[check.metric], _W[check.window])
            holds += counter
            args += (*counter, check.limit)
        keys = [self._marker_key, self._scope_key(scopes[0]), self._scope_key(scopes[1])]
        started = time.perf_counter()
        reply = await self._call(self._reserve, keys, args)
        if self._observe is not None:
            self._observe("reserve", time.perf_counter() - started)
        if reply[0] == -1:  # Redis lost its counters: put this source's usage back first, once
            await self._reseed_once()
            reply = await self._call(self._reserve, keys, args)
            if reply[0] == -1:
                raise LimitStoreUnavailable(UNAVAILABLE, retry_after=1)
        if self.reseed_error is not None:  # the counters are back (seeded here, or by another process)
            log.warning("limit store %s holds its counters again: requests are served again", self.shown)
            self.reseed_error = None
        now = _at(int(reply[1])).replace(microsecond=int(reply[2]))
        starts = self._windows(reply)
        if reply[0] == 0:
            over = [(int(reply[i]), int(reply[i + 1])) for i in range(8, len(reply), 2)]
            return pick_denial(checks, over, starts, now)
        gen = reply[3].decode() if isinstance(reply[3], bytes) else str(reply[3])
        return Reservation(now, scopes, amounts, starts, gen, tuple(holds))

    async def _reseed_once(self) -> None:
        async with self._reseeding:  # single-flight: the waiters find the marker set
            if await self._command("EXISTS", self._marker_key):
                return
            if self.reseed_error is not None and time.monotonic() - self._reseed_failed_at < RESEED_RETRY_S:
                raise LimitStoreUnavailable(RESEED_FAILED, retry_after=1)  # the waiters of a failed re-seed
            if self._reseed is None:
                await self.seed(self.source, [])
                return
            log.warning("limit store %s has no counters for %s: re-seeding them from the events", self.shown,
                        self.source)
            try:
                await self._reseed()
            except LimitStoreUnavailable:
                raise
            except Exception as exc:  # the events could not be read: refuse (503) until they can, never 500
                self.reseed_error, self._reseed_failed_at = f"{type(exc).__name__}: {exc}", time.monotonic()
                log.error("limit store %s lost its counters and re-seeding them from the events failed; requests "
                          "are refused until it succeeds: %s", self.shown, self.reseed_error)
                raise LimitStoreUnavailable(RESEED_FAILED, retry_after=1) from exc

    async def settle(self, reservation: Reservation, actual: Amounts) -> dict[tuple[Scope, str], int]:
        """As the interface says, except that a request that cost nothing returns {} (no budget moved,
        so there is no total to read)."""
        return await self._settle(reservation, vector(actual))

    async def release(self, reservation: Reservation) -> None:
        await self._settle(reservation, [0, 0, 0])

    async def _settle(self, reservation: Reservation, actual: list[int]) -> dict[tuple[Scope, str], int]:
        held = vector(reservation.amounts)
        scopes = reservation.scopes
        args = [reservation.generation or "", *self._epochs_of(reservation.starts), -held[0], -held[1], -held[2],
                *actual, GRACE_S, *reservation.holds]
        keys = [self._marker_key, self._scope_key(scopes[0]), self._scope_key(scopes[1])]
        started = time.perf_counter()
        reply = await self._call(self._settle_script, keys, args)
        if self._observe is not None:
            self._observe("settle", time.perf_counter() - started)
        if len(reply) != 8:
            return {}
        return {(scope, window): reply[s * 4 + w]
                for s, scope in enumerate(scopes) for w, window in enumerate(WINDOWS)}

    async def spent(self, scope: Scope, metric: str, window: str, at: datetime) -> Decimal:
        key = f"{self._scope_key(scope)}:{_W[window]}:{int(window_start(window, at).timestamp())}"
        value = await self._command("HGET", key, f"u{_M[metric]}")
        return from_units(metric, int(value or 0))

    async def seed(self, source: str, rows: list[SeedRow]) -> bool:
        args: list = [secrets.token_hex(8)]
        for row in rows:
            expire = int(window_end(row.window, row.start).timestamp()) + GRACE_S
            args += [self._scope_key(row.scope), _W[row.window], int(row.start.timestamp()), expire,
                     row.requests, row.tokens, row.usd]
        seeded = bool(await self._call(self._seed, [f"{self._prefix}:seeded:{source}"], args))
        if seeded:
            log.info("limit store seeded from %s: %d (scope, window) figures", source, len(rows))
        return seeded

    async def first_alert(self, key: str, until: datetime) -> bool:
        expire = int(until.timestamp()) + 86_400
        return await self._command("SET", f"{self._prefix}:alert:{key}", 1, "NX", "EXAT", expire) is not None

    async def advice(self) -> list[str]:
        """Redis may evict keys under memory pressure (a `maxmemory` with a policy other than `noeviction`,
        the default of several managed services): an evicted counter forgets usage and a budget under-counts
        without anyone noticing. Read from INFO, which managed services allow where CONFIG is disabled."""
        try:
            info = await self._command("INFO", "memory")
        except LimitStoreUnavailable:
            return []  # unreachable: /readyz and every request say so already
        fields = dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
        policy, limit = fields.get("maxmemory_policy", "noeviction"), int(fields.get("maxmemory", "0") or 0)
        if policy == "noeviction" or limit == 0:
            return []
        return [f"limit store {self.shown} has maxmemory {limit} bytes with maxmemory-policy {policy}: when it is "
                "full, Redis evicts keys, and an evicted limit counter forgets usage (budgets under-count) or an "
                "evicted seed marker makes a gateway count its events twice. Set maxmemory-policy noeviction "
                "(Redis then refuses writes when full, and Tollway refuses requests with 503), and size "
                "maxmemory for the counters (see the deployment guide)"]

    def instrument(self, observe: Callable[[str, float], None]) -> None:
        self._observe = observe

    def key_share(self) -> RedisKeyShare:
        """Provider-key health shared through the same Redis."""
        return RedisKeyShare(self.redis, self._prefix)

    async def check(self) -> str:
        """One PING with a short deadline (for /readyz)."""
        try:
            await asyncio.wait_for(self.pipe.send("PING"), 1.5)
        except (RedisUnavailable, RedisReplyError, TimeoutError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return f"redis {self.shown} unreachable: {self.last_error}"
        if self.reseed_error is not None:
            return f"redis {self.shown} lost its counters and re-seeding them from the events failed: {self.reseed_error}"
        return "ok"

    async def close(self) -> None:
        """Waits (bounded) for the replies of what was sent, so nothing issued before shutdown is lost."""
        await self.pipe.close()
        if self._redis is not None:
            await self._redis.aclose()
