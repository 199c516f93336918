"""Rate limits and budgets: a narrow, atomic store interface and its in-memory implementation.

A request reserves its worst case (1 request, estimated input + maximum output tokens, their cost)
against every limit that applies, all or nothing; when it ends it settles the real figures.
Counters are kept per tenant and per (tenant, user pseudonym), for every metric and every
calendar window (UTC): a limit added by a reload finds its window's usage already counted.
The store never sees a user id, only pseudonyms.

`LimitStore` is the seam for several gateway processes: a Redis store would implement `reserve`
(one Lua script: check every counter, then add) and `settle` with the same meaning.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Protocol

from policy.files import LimitRule

METRICS = ("requests", "tokens", "usd")
WINDOWS = ("minute", "hour", "day", "month")
ALERT_THRESHOLDS = (50, 80, 100)


def window_start(window: str, at: datetime) -> datetime:
    """The calendar window (UTC) that `at` falls in."""
    at = at.astimezone(UTC)
    if window == "minute":
        return at.replace(second=0, microsecond=0)
    if window == "hour":
        return at.replace(minute=0, second=0, microsecond=0)
    if window == "day":
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def window_end(window: str, start: datetime) -> datetime:
    if window == "minute":
        return start + timedelta(minutes=1)
    if window == "hour":
        return start + timedelta(hours=1)
    if window == "day":
        return start + timedelta(days=1)
    return (start + timedelta(days=32)).replace(day=1)


@dataclass(frozen=True, slots=True)
class Amounts:
    requests: int = 0
    tokens: int = 0
    usd: Decimal = Decimal(0)

    def get(self, metric: str) -> Decimal:
        return Decimal(getattr(self, metric))


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose counters a limit reads: the tenant as a whole (user None) or one user's."""

    tenant: str
    user: uuid.UUID | None


@dataclass(frozen=True, slots=True)
class AppliedLimit:
    rule: LimitRule
    scope: Scope


@dataclass(frozen=True, slots=True)
class Refusal:
    limit: AppliedLimit
    used: Decimal
    retry_after_s: int

    def message(self) -> str:
        rule = self.limit.rule
        tenant = self.limit.scope.tenant
        who = f"tenant {tenant!r}" if self.limit.scope.user is None else f"this user in tenant {tenant!r}"
        unit = {"usd": "USD", "tokens": "tokens", "requests": "requests"}[rule.metric]
        kind = "budget" if rule.metric == "usd" else "rate limit"
        return (f"{kind} reached for {who}: {rule.limit} {unit} per {rule.window} "
                f"(policy/limits.csv line {rule.line}; {self.used} used or reserved). Retry after {self.retry_after_s} s.")


@dataclass(slots=True)
class Reservation:
    at: datetime
    scopes: tuple[Scope, ...]
    amounts: Amounts
    starts: dict[str, datetime] = field(default_factory=dict)  # window -> its start when reserved


@dataclass(frozen=True, slots=True)
class Alert:
    limit: AppliedLimit
    threshold: int
    window_start: datetime
    spent: Decimal


class LimitStore(Protocol):
    async def reserve(self, limits: list[AppliedLimit], scopes: tuple[Scope, ...], amounts: Amounts,
                      at: datetime) -> Reservation | Refusal:
        """Atomically: refuse if any limit would be crossed, else add `amounts` as reserved everywhere."""

    async def settle(self, reservation: Reservation, actual: Amounts) -> None:
        """Replace the reservation by the real figures (in the windows it was made in)."""

    def spent(self, scope: Scope, metric: str, window: str, at: datetime) -> Decimal:
        """Settled use (no reservations) in the window containing `at`."""


class _Counter:
    __slots__ = ("start", "used", "reserved")

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.used = Decimal(0)
        self.reserved = Decimal(0)


class MemoryLimitStore:
    """One process's counters. Every method runs without awaiting, so each is atomic on the event loop."""

    def __init__(self) -> None:
        self._counters: dict[tuple[Scope, str, str], _Counter] = {}

    def _counter(self, scope: Scope, metric: str, window: str, start: datetime) -> _Counter:
        key = (scope, metric, window)
        counter = self._counters.get(key)
        if counter is None or counter.start != start:
            if counter is not None and counter.start > start:
                return _Counter(start)  # an older window than the current one: detached, not kept
            counter = self._counters[key] = _Counter(start)
        return counter

    def spent(self, scope: Scope, metric: str, window: str, at: datetime) -> Decimal:
        return self._counter(scope, metric, window, window_start(window, at)).used

    async def reserve(self, limits: list[AppliedLimit], scopes: tuple[Scope, ...], amounts: Amounts,
                      at: datetime) -> Reservation | Refusal:
        refusals = []
        for applied in limits:
            rule = applied.rule
            start = window_start(rule.window, at)
            counter = self._counter(applied.scope, rule.metric, rule.window, start)
            current = counter.used + counter.reserved
            if current + amounts.get(rule.metric) > rule.limit:
                wait = max(1, int((window_end(rule.window, start) - at).total_seconds() + 0.999))
                refusals.append(Refusal(applied, current, wait))
        if refusals:  # the one the client must wait longest for; then the smallest limit
            return max(refusals, key=lambda r: (r.retry_after_s, -r.limit.rule.limit))
        reservation = Reservation(at, scopes, amounts, {w: window_start(w, at) for w in WINDOWS})
        self._apply(reservation, amounts, reserved_sign=1)
        return reservation

    async def settle(self, reservation: Reservation, actual: Amounts) -> None:
        self._apply(reservation, reservation.amounts, reserved_sign=-1)
        self._apply(reservation, actual, reserved_sign=0)

    def seed(self, scope: Scope, metric: str, window: str, start: datetime, used: Decimal) -> None:
        """Counted usage from before a restart (rebuilt from events.duckdb)."""
        self._counter(scope, metric, window, start).used += used

    def _apply(self, reservation: Reservation, amounts: Amounts, reserved_sign: int) -> None:
        for scope in reservation.scopes:
            for metric in METRICS:
                value = amounts.get(metric)
                if not value:
                    continue
                for window, start in reservation.starts.items():
                    counter = self._counter(scope, metric, window, start)
                    if reserved_sign:
                        counter.reserved += reserved_sign * value
                    else:
                        counter.used += value


def crossed_thresholds(spent_before: Decimal, spent_after: Decimal, limit: Decimal) -> list[int]:
    """Alert thresholds (percent of a budget) that this spend crossed.

    >>> crossed_thresholds(Decimal(40), Decimal(85), Decimal(100))
    [50, 80]
    """
    if limit <= 0:
        return []
    return [t for t in ALERT_THRESHOLDS if spent_before * 100 < t * limit <= spent_after * 100]
