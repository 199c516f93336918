"""Which provider key serves a request: the route's pool, minus keys that are failing or cooling down.

A key's health, as the provider's answers show it:
- a 429 cools the key down for the provider's `Retry-After` (1 s when it sends none, at most an hour);
- a 401 counts a strike; `STRIKES` in a row within `STRIKE_WINDOW_S` mark the key failing until it is
  rotated (one 401 may be the provider's hiccup; a success clears the strikes);
- a 403 is about the request (a model the account may not use, a region), never about the key.
When every key of a route is failing, the refusal is the operator's to fix (`KeysFailing`, 503),
not a policy denial.

Health is read from this process's memory (the request path pays a dict lookup). With a shared limit
store, what one gateway learns is shared through `KeyShare` (async, off the request path): its
cool-downs reach every other gateway within milliseconds, and 401 strikes are counted across all of
them, so a key the provider rate-limits is rested everywhere, not only where the 429 was seen.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Protocol

from policy.files import RouteRule
from policy.loader import PolicySet
from proxy.auth import ControlView
from proxy.control import ProviderKey
from proxy.errors import KeysFailing, NoRoute, RateLimited
from proxy.metrics import Metrics

log = logging.getLogger("tollway.gateway")
STRIKES = 3
STRIKE_WINDOW_S = 60.0
_MAX_COOL_DOWN_S = 3600.0


class KeyShare(Protocol):
    """Key health shared between gateway processes (the Redis store's); None: this process only."""

    async def start(self, cooled: Callable[[str, float], None], failing: Callable[[str, str], None],
                    struck: Callable[[str], None]) -> None:
        """Deliver what other processes learn: a cool-down (key id, seconds left), a key marked failing
        (key id, reason), a 401 strike (key id)."""

    async def cool_down(self, key_id: str, seconds: float) -> None: ...

    async def strike(self, key_id: str, window_s: float) -> int:
        """Count a 401 against the key; returns the strikes within `window_s`, every process's."""

    async def clear_strikes(self, key_id: str) -> None: ...

    async def failing(self, key_id: str, reason: str) -> None: ...

    async def close(self) -> None: ...


class KeyPools:
    def __init__(self, control: ControlView, metrics: Metrics, persist_failing: Callable[[str, str], None],
                 share: KeyShare | None = None) -> None:
        self._control = control
        self._metrics = metrics
        self._persist_failing = persist_failing  # (key id, reason): written to control.db off the request path
        self._cooling: dict[str, float] = {}  # key id -> monotonic time its 429 cool-down ends
        self._strikes: dict[str, list[float]] = {}  # key id -> monotonic times of its recent 401s
        self._share = share
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        if self._share is not None:
            await self._share.start(self._cooled, self._mark_failing, self._struck)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._share is not None:
            await self._share.close()

    def pool(self, route: RouteRule | None, tenant: str, provider: str, model: str) -> list[ProviderKey]:
        """The route's keys to try, in order: usable, not failing, not cooling down after a 429."""
        if route is None:
            raise NoRoute(f"No key route for tenant {tenant!r} and model {model!r}. "
                          "Ask your governance lead to add one to policy/routes.csv.")
        usable = self.usable(route, tenant, provider)
        if not usable:
            raise NoRoute(f"The key route for tenant {tenant!r} and model {model!r} (routes.csv line {route.line}) "
                          "names no usable key: each is missing, revoked, for another provider or another tenant's. "
                          "Ask your operator to check `tollway keys list`.")
        now = time.monotonic()
        pool = [k for k in usable if k.health == "ok" and self._cooling.get(k.key_id, 0) <= now]
        if pool:
            return pool
        cooling = [self._cooling[k.key_id] - now for k in usable if self._cooling.get(k.key_id, 0) > now]
        if cooling:
            wait = math.ceil(min(cooling))
            raise RateLimited(f"Every key for {model!r} is cooling down after the provider's rate limit. "
                              f"Retry after {wait} s.", retry_after=wait)
        raise KeysFailing(f"Every provider key that serves {model!r} for tenant {tenant!r} is failing: the provider "
                          f"refused it ({usable[0].key_id!r}: {usable[0].health.removeprefix('failing: ')}). This is "
                          "not about your credential or the policy: ask your Tollway operator to rotate the key "
                          "(`tollway keys rotate`).")

    def usable(self, route: RouteRule, tenant: str, provider: str) -> list[ProviderKey]:
        """The route's keys that exist, are active, serve this provider, and are the tenant's or the operator's."""
        keys = (self._control.keys.get(key_id) for key_id in route.key_ids)
        return [k for k in keys
                if k and k.status == "active" and k.provider == provider and k.owner_tenant in (None, tenant)]

    def listing_key(self, policies: PolicySet, tenant: str, provider: str) -> ProviderKey | None:
        """A key that may list this provider's models for the tenant: the first usable one of its routes."""
        for route in _provider_routes(policies, tenant, provider):
            healthy = [k for k in self.usable(route, tenant, provider) if k.health == "ok"]
            if healthy:
                return healthy[0]
        return None

    def provider_pool(self, policies: PolicySet, tenant: str, provider: str, prefer: str | None = None
                      ) -> list[ProviderKey]:
        """Keys for a call that names no model (files, batches, stored objects): the first of the tenant's
        routes for this provider that has a usable key. `prefer`: the key that created the object the
        call is about, tried first (an object lives in the provider account of the key that made it)."""
        for route in _provider_routes(policies, tenant, provider):
            if self.usable(route, tenant, provider):
                return preferring(self.pool(route, tenant, provider, f"{provider}/*"), prefer)
        raise NoRoute(f"No key route for tenant {tenant!r} serves provider {provider!r}. "
                      "Ask your governance lead to add one to policy/routes.csv.")

    def answered(self, key: ProviderKey, status: int, retry_after: str | None) -> None:
        """What the provider's status says about the key."""
        if status < 400:
            if self._strikes and self._strikes.pop(key.key_id, None) and self._share is not None:
                self._background(self._share.clear_strikes(key.key_id))
        elif status == 401:
            self._unauthorized(key)
        elif status == 429:
            self._rate_limited(key, retry_after)

    def failed(self, key: ProviderKey, reason: str) -> None:
        """The provider could not be reached or timed out with this key (counted, not held against it)."""
        self._metrics.key_failures.labels(key.key_id, reason).inc()

    def _unauthorized(self, key: ProviderKey) -> None:
        self._metrics.key_failures.labels(key.key_id, "401").inc()
        now = time.monotonic()
        strikes = [t for t in self._strikes.get(key.key_id, ()) if now - t < STRIKE_WINDOW_S] + [now]
        if self._share is not None:  # counted across every process
            self._strikes[key.key_id] = strikes
            self._background(self._shared_strike(key.key_id))
            return
        if len(strikes) < STRIKES:
            self._strikes[key.key_id] = strikes
            return
        self._mark_failing(key.key_id, f"provider answered 401 {STRIKES} times in a row")

    async def _shared_strike(self, key_id: str) -> None:
        if await self._share.strike(key_id, STRIKE_WINDOW_S) >= STRIKES:
            reason = f"provider answered 401 {STRIKES} times in a row"
            self._mark_failing(key_id, reason)
            await self._share.failing(key_id, reason)

    def _mark_failing(self, key_id: str, reason: str) -> None:
        """Until rotated: in this process now, in control.db through the writer (idempotent)."""
        self._strikes.pop(key_id, None)
        key = self._control.keys.get(key_id)
        if key is None or key.health.startswith("failing"):
            return
        self._control.keys[key_id] = replace(key, health=f"failing: {reason}")
        self._persist_failing(key_id, reason)

    def _cooled(self, key_id: str, seconds: float) -> None:
        """Another process's cool-down (or one this process shared and hears back)."""
        self._cooling[key_id] = max(self._cooling.get(key_id, 0), time.monotonic() + seconds)

    def _struck(self, key_id: str) -> None:
        """Another process counted a 401: a success here clears the shared count."""
        self._strikes.setdefault(key_id, []).append(time.monotonic())

    def _background(self, work: Coroutine) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("sharing key health failed: %s", task.exception())

    def _rate_limited(self, key: ProviderKey, retry_after: str | None) -> None:
        try:
            seconds = float(retry_after) if retry_after else 1.0
        except ValueError:  # an HTTP date or garbage: a short default cool-down
            seconds = 1.0
        if seconds != seconds:  # NaN
            seconds = 1.0
        seconds = min(max(seconds, 0.1), _MAX_COOL_DOWN_S)
        self._cooling[key.key_id] = time.monotonic() + seconds
        self._metrics.key_failures.labels(key.key_id, "429").inc()
        if self._share is not None:
            self._background(self._share.cool_down(key.key_id, seconds))


def preferring(pool: list[ProviderKey], key_id: str | None) -> list[ProviderKey]:
    """The pool with `key_id` first, when it is in it."""
    if key_id is None or not pool or pool[0].key_id == key_id:
        return pool
    return sorted(pool, key=lambda k: k.key_id != key_id)


def _provider_routes(policies: PolicySet, tenant: str, provider: str) -> list[RouteRule]:
    """The tenant's routes whose model glob can match some model of `provider`, in file order."""
    return [r for r in policies.files.routes if r.tenant in (tenant, "*")
            and (r.model_glob.startswith(f"{provider}/") or r.model_glob[:1] in ("*", "?"))]
