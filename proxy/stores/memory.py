"""One process's limit counters, in memory: the default store, and the one the request path must keep fast.

Every method runs without awaiting, so each is atomic on the event loop; a reservation adds its
worst case to the counters its limits check (as the Redis store does), a settle adds the real figures
to every window of both scopes. Counters for a scope hold only the current calendar windows: a window
that moves on empties its counters, and a settle for a window that moved on is dropped.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

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
    window_start,
)

_W = len(WINDOWS)
_SLOTS = len(METRICS) * _W
_WINDOW_INDEX = {w: i for i, w in enumerate(WINDOWS)}
_SLOT = {(m, w): i * _W + j for i, m in enumerate(METRICS) for j, w in enumerate(WINDOWS)}
_SLOT_OF = {m: {w: _SLOT[m, w] for w in WINDOWS} for m in METRICS}  # two lookups, no tuple built per check
_USD_BASE = _SLOT["usd", WINDOWS[0]]


class _ScopeCounters:
    """Every (metric, window) counter of one scope, for the current calendar windows."""

    __slots__ = ("minute", "starts", "used", "reserved")

    def __init__(self) -> None:
        self.minute = -1  # the minute the windows were last rolled to: rolling to it again is a no-op
        self.starts: list[datetime | None] = [None] * _W
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
                self.used[m * _W + w] = self.reserved[m * _W + w] = 0

    def live(self, w: int, start: datetime) -> bool:
        return self.starts[w] == start


class MemoryLimitStore:
    """Counters, seeded sources and sent alerts of one process."""

    def __init__(self) -> None:
        self._scopes: dict[Scope, _ScopeCounters] = {}
        self._minute = -1
        self._minute_starts: tuple[datetime, ...] = ()
        self._seeded: set[str] = set()
        self._alerted: dict[str, datetime] = {}  # alert key -> when it may be forgotten

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

    async def spent(self, scope: Scope, metric: str, window: str, at: datetime) -> Decimal:
        starts, minute = self._starts(at)
        counters = self._counters(scope, starts, minute)
        w = _WINDOW_INDEX[window]
        if not counters.live(w, starts[w]):
            return Decimal(0)  # an earlier window than the one counted now
        return from_units(metric, counters.used[_SLOT[metric, window]])

    async def reserve(self, checks: list[Check], scopes: tuple[Scope, ...], amounts: Amounts,
                      at: datetime) -> Reservation | Denied:
        starts, minute = self._starts(at)
        tenant_counters, user_counters = (self._counters(scope, starts, minute) for scope in scopes)
        wanted = vector(amounts)
        over = None
        cells = []
        for index, (scope, metric, window, limit) in enumerate(checks):
            counters = tenant_counters if scope.user is None else user_counters
            slot = _SLOT_OF[metric][window]
            value = wanted[slot // _W]
            current = counters.used[slot] + counters.reserved[slot]
            if current + value > limit:
                over = over or []
                over.append((index, current))
            elif value and counters.starts[slot % _W] == starts[slot % _W]:  # a window still at `starts`
                cells.append((counters, slot, value))
        if over:
            return pick_denial(checks, over, starts, at)
        for counters, slot, value in cells:  # as in Redis: held only in the counters a limit checks
            counters.reserved[slot] += value
        return Reservation(at, scopes, amounts, starts, None, tuple(cells))

    async def settle(self, reservation: Reservation, actual: Amounts) -> dict[tuple[Scope, str], int]:
        return self._settle(reservation, vector(actual))

    async def release(self, reservation: Reservation) -> None:
        self._settle(reservation, [0] * len(METRICS))

    def _settle(self, reservation: Reservation, spent: list[int]) -> dict[tuple[Scope, str], int]:
        starts = reservation.starts
        for counters, slot, value in reservation.holds:
            if counters.starts[slot % _W] == starts[slot % _W]:  # else the window rolled over, figures and all
                counters.reserved[slot] -= value
        minute = int(reservation.at.timestamp() // 60)
        usd_totals = {}
        for scope in reservation.scopes:
            counters = self._counters(scope, starts, minute)  # windows only move forward: a later one stays
            used = counters.used
            for w, window in enumerate(WINDOWS):
                if counters.starts[w] != starts[w]:
                    continue  # the window rolled over since the reservation: its figures went with it
                for m, value in enumerate(spent):
                    used[m * _W + w] += value
                usd_totals[scope, window] = used[_USD_BASE + w]
        return usd_totals

    async def seed(self, source: str, rows: list[SeedRow]) -> bool:
        """Counted usage from before a restart (rebuilt from events.duckdb), once per source."""
        if source in self._seeded:
            return False
        self._seeded.add(source)
        for row in rows:
            counters = self._scopes.get(row.scope) or self._scopes.setdefault(row.scope, _ScopeCounters())
            w = _WINDOW_INDEX[row.window]
            counters.roll_window(w, row.start)
            if counters.live(w, row.start):
                for m, value in enumerate((row.requests, row.tokens, row.usd)):
                    counters.used[m * _W + w] += value
        return True

    async def first_alert(self, key: str, until: datetime) -> bool:
        if key in self._alerted:
            return False
        if len(self._alerted) > 50_000:  # forget alerts of windows that are over
            now = datetime.now(UTC)
            self._alerted = {k: u for k, u in self._alerted.items() if u > now}
        self._alerted[key] = until
        return True

    async def advice(self) -> list[str]:
        return []

    def instrument(self, observe) -> None:
        """Nothing to report: every call is a few list operations, never waited for."""

    def key_share(self) -> None:
        """Key health stays in this process (`proxy.keys`)."""
        return None

    def attach(self, source: str, reseed) -> None:
        """Nothing to re-seed: these counters live and die with the process."""

    async def check(self) -> str:
        return "ok"

    async def close(self) -> None:
        return None
