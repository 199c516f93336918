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


_NANO = Decimal("1e9")
_SLOTS = len(METRICS) * len(WINDOWS)


def _units(metric: str, value: Decimal) -> int:
    """Counters are integers: requests, tokens, and nano-dollars (exact: costs are quantized to 1e-9)."""
    return int(value * _NANO) if metric == "usd" else int(value)


def _from_units(metric: str, value: int) -> Decimal:
    return Decimal(value) / _NANO if metric == "usd" else Decimal(value)


def _slot(metric: str, window: str) -> int:
    return METRICS.index(metric) * len(WINDOWS) + WINDOWS.index(window)


_WINDOW_INDEX = {w: i for i, w in enumerate(WINDOWS)}
_SLOT = {(m, w): _slot(m, w) for m in METRICS for w in WINDOWS}


class _ScopeCounters:
    """Every (metric, window) counter of one scope, for the current calendar windows."""

    __slots__ = ("starts", "used", "reserved")

    def __init__(self) -> None:
        self.starts: list[datetime | None] = [None] * len(WINDOWS)
        self.used = [0] * _SLOTS
        self.reserved = [0] * _SLOTS

    def roll(self, starts: tuple[datetime, ...]) -> None:
        """Move each window forward to `starts` (never back), emptying the windows that moved."""
        for w, start in enumerate(starts):
            self.roll_window(w, start)

    def roll_window(self, w: int, start: datetime) -> None:
        current = self.starts[w]
        if current is None or start > current:
            self.starts[w] = start
            for m in range(len(METRICS)):
                self.used[m * len(WINDOWS) + w] = self.reserved[m * len(WINDOWS) + w] = 0

    def live(self, w: int, start: datetime) -> bool:
        return self.starts[w] == start


class MemoryLimitStore:
    """One process's counters. Every method runs without awaiting, so each is atomic on the event loop."""

    def __init__(self) -> None:
        self._scopes: dict[Scope, _ScopeCounters] = {}
        self._starts_minute: tuple[int, tuple[datetime, ...]] = (-1, ())

    def _starts(self, at: datetime) -> tuple[datetime, ...]:
        minute = int(at.timestamp() // 60)
        if minute != self._starts_minute[0]:  # every window start is the same for a whole minute
            self._starts_minute = (minute, tuple(window_start(w, at) for w in WINDOWS))
        return self._starts_minute[1]

    def _counters(self, scope: Scope, starts: tuple[datetime, ...]) -> _ScopeCounters:
        counters = self._scopes.get(scope)
        if counters is None:
            counters = self._scopes[scope] = _ScopeCounters()
        counters.roll(starts)
        return counters

    def spent(self, scope: Scope, metric: str, window: str, at: datetime) -> Decimal:
        counters = self._counters(scope, self._starts(at))
        return _from_units(metric, counters.used[_SLOT[metric, window]])

    async def reserve(self, limits: list[AppliedLimit], scopes: tuple[Scope, ...], amounts: Amounts,
                      at: datetime) -> Reservation | Refusal:
        starts = self._starts(at)
        wanted = _vector(amounts)
        refusals = []
        for applied in limits:
            rule = applied.rule
            slot = _SLOT[rule.metric, rule.window]
            counters = self._counters(applied.scope, starts)
            current = counters.used[slot] + counters.reserved[slot]
            if current + wanted[slot // len(WINDOWS)] > _units(rule.metric, rule.limit):
                start = starts[_WINDOW_INDEX[rule.window]]
                wait = max(1, int((window_end(rule.window, start) - at).total_seconds() + 0.999))
                refusals.append(Refusal(applied, _from_units(rule.metric, current), wait))
        if refusals:  # the one the client must wait longest for; then the smallest limit
            return max(refusals, key=lambda r: (r.retry_after_s, -r.limit.rule.limit))
        reservation = Reservation(at, scopes, amounts, dict(zip(WINDOWS, starts, strict=True)))
        for scope in scopes:
            _add(self._counters(scope, starts).reserved, wanted, None, starts)
        return reservation

    async def settle(self, reservation: Reservation, actual: Amounts) -> None:
        starts = tuple(reservation.starts[w] for w in WINDOWS)
        held, spent = _vector(reservation.amounts), _vector(actual)
        for scope in reservation.scopes:
            counters = self._counters(scope, starts)  # windows only move forward: a later one stays
            _add(counters.reserved, [-v for v in held], counters, starts)
            _add(counters.used, spent, counters, starts)

    def seed(self, scope: Scope, metric: str, window: str, start: datetime, used: Decimal) -> None:
        """Counted usage from before a restart (rebuilt from events.duckdb)."""
        counters = self._scopes.get(scope) or self._scopes.setdefault(scope, _ScopeCounters())
        counters.roll_window(_WINDOW_INDEX[window], start)
        if counters.live(_WINDOW_INDEX[window], start):
            counters.used[_SLOT[metric, window]] += _units(metric, used)


def _vector(amounts: Amounts) -> list[int]:
    return [amounts.requests, amounts.tokens, _units("usd", amounts.usd)]


def _add(target: list[int], per_metric: list[int], counters: _ScopeCounters | None,
         starts: tuple[datetime, ...]) -> None:
    """Add a per-metric amount to every window; with `counters`, only to windows still at `starts`."""
    for w in range(len(WINDOWS)):
        if counters is not None and not counters.live(w, starts[w]):
            continue  # the window rolled over since the reservation: its figures went with it
        for m, value in enumerate(per_metric):
            if value:
                target[m * len(WINDOWS) + w] += value


def crossed_thresholds(spent_before: Decimal, spent_after: Decimal, limit: Decimal) -> list[int]:
    """Alert thresholds (percent of a budget) that this spend crossed.

    >>> crossed_thresholds(Decimal(40), Decimal(85), Decimal(100))
    [50, 80]
    """
    if limit <= 0:
        return []
    return [t for t in ALERT_THRESHOLDS if spent_before * 100 < t * limit <= spent_after * 100]
