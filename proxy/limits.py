"""Rate limits and budgets: the vocabulary and the narrow, atomic, backend-neutral store interface.

A request reserves its worst case (1 request, estimated input + maximum output tokens, their cost)
against every limit that applies, all or nothing; when it ends it settles the real figures.
Counters are kept per tenant and per (tenant, user pseudonym), for every metric and every
calendar window (UTC): a limit added by a reload finds its window's usage already counted.
The store never sees a user id, only pseudonyms, and never a limits.csv rule: it gets plain values
(`Check`: scope, metric, window, limit in integer units) and answers with plain values (`Denied`:
which check, how much was used, how long to wait), so a shared store (Redis) implements the same
meaning in one script per call. Implementations: `proxy.stores.memory` (one process, the default)
and `proxy.stores.redis_limits` (every gateway process and machine).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import NamedTuple, Protocol

from policy.files import LimitRule

METRICS = ("requests", "tokens", "usd")
WINDOWS = ("minute", "hour", "day", "month")
ALERT_THRESHOLDS = (50, 80, 100)

_NANO = Decimal("1e9")


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


def from_units(metric: str, value: int) -> Decimal:
    """A counter's integer units as the metric's own value (USD for `usd`)."""
    return _from_units(metric, value)


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


def vector(amounts: Amounts) -> list[int]:
    """Amounts as integer units in METRICS order."""
    return [amounts.requests, amounts.tokens, _units("usd", amounts.usd)]


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose counters a limit reads: the tenant as a whole (user None) or one user's."""

    tenant: str
    user: uuid.UUID | None


class Check(NamedTuple):
    """One limit a reservation must fit under, in plain values: `limit` is in integer units."""

    scope: Scope
    metric: str
    window: str
    limit: int


class Denied(NamedTuple):
    """A store's refusal: `checks[index]` would be crossed; `used` units were used or reserved."""

    index: int
    used: int
    retry_after_s: int


class SeedRow(NamedTuple):
    """Usage counted before the store started (rebuilt from events): one scope in one window."""

    scope: Scope
    window: str
    start: datetime
    requests: int
    tokens: int
    usd: int  # nano-dollars


class AppliedLimit:
    """A limits.csv rule bound to the scope it counts in, as the `Check` a store is given."""

    __slots__ = ("rule", "scope", "per_user", "check", "limit_units")

    def __init__(self, rule: LimitRule, scope: Scope) -> None:
        self.rule, self.scope, self.per_user = rule, scope, scope.user is not None
        self.limit_units = _units(rule.metric, rule.limit)
        self.check = Check(scope, rule.metric, rule.window, self.limit_units)


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


def refusal(limits: list[AppliedLimit], denied: Denied) -> Refusal:
    """The store's `Denied` in the words of the limits.csv rule it refers to."""
    applied = limits[denied.index]
    return Refusal(applied, _from_units(applied.rule.metric, denied.used), denied.retry_after_s)


@dataclass(slots=True)
class Reservation:
    at: datetime
    scopes: tuple[Scope, ...]
    amounts: Amounts
    starts: tuple[datetime, ...]  # the start of each window (WINDOWS order) it was counted in
    generation: str | None = None  # the shared store's counter generation it was made in (Redis)
    holds: tuple = ()  # the counters its amounts are held in (the checked ones), in the store's own terms


@dataclass(frozen=True, slots=True)
class Alert:
    limit: AppliedLimit
    threshold: int
    window_start: datetime
    spent: Decimal


class LimitStore(Protocol):
    async def reserve(self, checks: list[Check], scopes: tuple[Scope, ...], amounts: Amounts,
                      at: datetime) -> Reservation | Denied:
        """Atomically: deny if any check would be crossed, else hold `amounts` in each checked counter (`scopes`
        is (the tenant's, the user's); each check counts in one of them). A counter no check reads holds
        nothing: it gets the real figures at settle."""

    async def settle(self, reservation: Reservation, actual: Amounts) -> dict[tuple[Scope, str], int]:
        """Replace the reservation by the real figures (in the windows it was made in).

        Returns the settled usd spend, in nano-dollars, of each (scope, window) it counted in."""

    async def release(self, reservation: Reservation) -> None:
        """Drop the reservation without counting anything (the request never reached a provider)."""

    async def spent(self, scope: Scope, metric: str, window: str, at: datetime) -> Decimal:
        """Settled use (no reservations) in the window containing `at`."""

    async def seed(self, source: str, rows: list[SeedRow]) -> bool:
        """Add usage counted before the store started, once per `source` (an events store) for as long as
        the store's counters live; False when `source` was already seeded."""

    async def first_alert(self, key: str, until: datetime) -> bool:
        """True the first time `key` is seen (until `until`): an alert is sent once, by one process."""

    def attach(self, source: str, reseed: Callable[[], Awaitable[None]] | None) -> None:
        """`source` names the event store this process seeds from; `reseed` puts its usage back into a
        shared store that lost its counters (Redis restarted empty)."""

    async def advice(self) -> list[str]:
        """Settings of the store that put limits at risk, for the operator (logged at start); [] when none."""

    def instrument(self, observe: Callable[[str, float], None]) -> None:
        """Report each reserve and settle's duration (call name, seconds) to `observe` (for /metrics); a store
        whose calls cost microseconds (memory) has nothing to report."""

    def key_share(self) -> object | None:
        """`proxy.keys.KeyShare` for key health shared with other processes; None: in-process only."""

    async def check(self) -> str:
        """"ok", or why the store cannot be used right now (for /readyz)."""

    async def close(self) -> None:
        """Release connections."""


def pick_denial(checks: list[Check], over: list[tuple[int, int]], starts: tuple[datetime, ...],
                at: datetime) -> Denied:
    """Of the checks that would be crossed ((index, used) pairs), the one the client must wait longest
    for; then the smallest limit."""
    best, best_key = None, None
    for index, used in over:
        check = checks[index]
        start = starts[WINDOWS.index(check.window)]
        wait = max(1, int((window_end(check.window, start) - at).total_seconds() + 0.999))
        key = (wait, -_from_units(check.metric, check.limit))
        if best_key is None or key > best_key:
            best, best_key = Denied(index, used, wait), key
    return best


def crossed_thresholds(spent_before: Decimal | int, spent_after: Decimal | int, limit: Decimal | int) -> list[int]:
    """Alert thresholds (percent of a budget) that this spend crossed (any exact numbers, same unit).

    >>> crossed_thresholds(Decimal(40), Decimal(85), Decimal(100))
    [50, 80]
    """
    if limit <= 0:
        return []
    return [t for t in ALERT_THRESHOLDS if spent_before * 100 < t * limit <= spent_after * 100]


def __getattr__(name: str):
    """`MemoryLimitStore` moved to `proxy.stores.memory`; still importable from here."""
    if name == "MemoryLimitStore":
        from proxy.stores.memory import MemoryLimitStore
        return MemoryLimitStore
    raise AttributeError(name)
