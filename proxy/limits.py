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

_NANO = Decimal("1e9")
_SLOTS = len(METRICS) * len(WINDOWS)
_WINDOW_INDEX = {w: i for i, w in enumerate(WINDOWS)}
_SLOT = {(m, w): i * len(WINDOWS) + j for i, m in enumerate(METRICS) for j, w in enumerate(WINDOWS)}
_USD_BASE = _SLOT["usd", WINDOWS[0]]


def _units(metric: str, value: Decimal) -> int:
    """Counters are integers: requests, tokens, and nano-dollars (exact: costs are quantized to 1e-9)."""
    return int(value * _NANO) if metric == "usd" else int(value)


def _from_units(metric: str, value: int) -> Decimal:
    return Decimal(value) / _NANO if metric == "usd" else Decimal(value)


def usd_units(value: Decimal) -> int:
    """USD as the integer nano-dollars the counters hold."""
    return _units("usd", value)


def usd_value(units: int) -> Decimal:
    return _from_units("usd", units)


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


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose counters a limit reads: the tenant as a whole (user None) or one user's."""

    tenant: str
    user: uuid.UUID | None


class AppliedLimit:
    """A limits.csv rule bound to the scope it counts in, its counter slot and integer limit precomputed."""

    __slots__ = ("rule", "scope", "per_user", "slot", "window_index", "limit_units")

    def __init__(self, rule: LimitRule, scope: Scope) -> None:
        self.rule, self.scope, self.per_user = rule, scope, scope.user is not None
        self.slot = _SLOT[rule.metric, rule.window]
        self.window_index = _WINDOW_INDEX[rule.window]
        self.limit_units = _units(rule.metric, rule.limit)


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

    async def settle(self, reservation: Reservation, actual: Amounts) -> dict[tuple[Scope, str], int]:
        """Replace the reservation by the real figures (in the windows it was made in).

        Returns the settled usd spend, in nano-dollars, of each (scope, window) it counted in."""

    def spent(self, scope: Scope, metric: str, window: str, at: datetime) -> Decimal:
        """Settled use (no reservations) in the window containing `at`."""


class _ScopeCounters:
    """Every (metric, window) counter of one scope, for the current calendar windows."""

    __slots__ = ("minute", "starts", "used", "reserved")

    def __init__(self) -> None:
        self.minute = -1  # the minute the windows were last rolled to: rolling to it again is a no-op
        self.starts: list[datetime | None] = [None] * len(WINDOWS)
        self.used = [0] * _SLOTS
        self.reserved = [0] * _SLOTS

    def roll(self, starts: tuple[datetime, ...], minute: int) -> None:
        """Move each window forward to `starts` (never back), emptying the windows that moved."""
        if minute == self.minute:
            return
        for w, start in enumerate(starts):
            self.roll_window(w, start)
        self.minute = max(self.minute, minute)

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
        self._minute = -1
        self._minute_starts: tuple[datetime, ...] = ()

    def _starts(self, at: datetime) -> tuple[tuple[datetime, ...], int]:
        """The window starts containing `at`, and its minute number (every start is fixed for a minute)."""
        minute = int(at.timestamp() // 60)
        if minute == self._minute:
            return self._minute_starts, minute
        starts = tuple(window_start(w, at) for w in WINDOWS)
        if minute > self._minute:
            self._minute, self._minute_starts = minute, starts
        return starts, minute

    def _counters(self, scope: Scope, starts: tuple[datetime, ...], minute: int) -> _ScopeCounters:
        counters = self._scopes.get(scope)
        if counters is None:
            counters = self._scopes[scope] = _ScopeCounters()
        counters.roll(starts, minute)
        return counters

    def spent(self, scope: Scope, metric: str, window: str, at: datetime) -> Decimal:
        starts, minute = self._starts(at)
        counters = self._counters(scope, starts, minute)
        w = _WINDOW_INDEX[window]
        if not counters.live(w, starts[w]):
            return Decimal(0)  # an earlier window than the one counted now
        return _from_units(metric, counters.used[_SLOT[metric, window]])

    async def reserve(self, limits: list[AppliedLimit], scopes: tuple[Scope, ...], amounts: Amounts,
                      at: datetime) -> Reservation | Refusal:
        """`scopes` is (the tenant's, the user's); each limit counts in one of them."""
        starts, minute = self._starts(at)
        tenant_counters, user_counters = (self._counters(scope, starts, minute) for scope in scopes)
        wanted = _vector(amounts)
        refusals = None
        for applied in limits:
            counters = user_counters if applied.per_user else tenant_counters
            slot = applied.slot
            current = counters.used[slot] + counters.reserved[slot]
            if current + wanted[slot // len(WINDOWS)] > applied.limit_units:
                start = starts[applied.window_index]
                wait = max(1, int((window_end(applied.rule.window, start) - at).total_seconds() + 0.999))
                refusals = refusals or []
                refusals.append(Refusal(applied, _from_units(applied.rule.metric, current), wait))
        if refusals:  # the one the client must wait longest for; then the smallest limit
            return max(refusals, key=lambda r: (r.retry_after_s, -r.limit.rule.limit))
        for counters in (tenant_counters, user_counters):
            for w in range(len(WINDOWS)):
                if counters.starts[w] == starts[w]:  # only windows still at `starts`
                    for m, value in enumerate(wanted):
                        counters.reserved[m * len(WINDOWS) + w] += value
        return Reservation(at, scopes, amounts, dict(zip(WINDOWS, starts, strict=True)))

    async def settle(self, reservation: Reservation, actual: Amounts) -> dict[tuple[Scope, str], int]:
        starts = tuple(reservation.starts[w] for w in WINDOWS)
        minute = int(reservation.at.timestamp() // 60)
        held, spent = _vector(reservation.amounts), _vector(actual)
        usd_totals = {}
        for scope in reservation.scopes:
            counters = self._counters(scope, starts, minute)  # windows only move forward: a later one stays
            for w, window in enumerate(WINDOWS):
                if counters.starts[w] != starts[w]:
                    continue  # the window rolled over since the reservation: its figures went with it
                for m in range(len(METRICS)):
                    slot = m * len(WINDOWS) + w
                    counters.reserved[slot] -= held[m]
                    counters.used[slot] += spent[m]
                usd_totals[scope, window] = counters.used[_USD_BASE + w]
        return usd_totals

    def seed(self, scope: Scope, metric: str, window: str, start: datetime, used: Decimal) -> None:
        """Counted usage from before a restart (rebuilt from events.duckdb)."""
        counters = self._scopes.get(scope) or self._scopes.setdefault(scope, _ScopeCounters())
        counters.roll_window(_WINDOW_INDEX[window], start)
        if counters.live(_WINDOW_INDEX[window], start):
            counters.used[_SLOT[metric, window]] += _units(metric, used)


def _vector(amounts: Amounts) -> list[int]:
    return [amounts.requests, amounts.tokens, _units("usd", amounts.usd)]


def crossed_thresholds(spent_before: Decimal | int, spent_after: Decimal | int, limit: Decimal | int) -> list[int]:
    """Alert thresholds (percent of a budget) that this spend crossed (any exact numbers, same unit).

    >>> crossed_thresholds(Decimal(40), Decimal(85), Decimal(100))
    [50, 80]
    """
    if limit <= 0:
        return []
    return [t for t in ALERT_THRESHOLDS if spent_before * 100 < t * limit <= spent_after * 100]
