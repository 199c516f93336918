"""Limits for one request: what applies, the worst-case reservation, the settlement, budget alerts,
and rebuilding the current windows from `events.duckdb` after a restart (or after a shared store
came back empty). The store gets plain `Check`s; this module turns its answers back into the words
of limits.csv."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import duckdb

from policy.loader import PolicySet
from proxy.errors import BudgetExceeded, RateLimited
from proxy.events import Event
from proxy.limits import (
    WINDOWS,
    Alert,
    Amounts,
    AppliedLimit,
    Denied,
    LimitStore,
    Refusal,
    Reservation,
    Scope,
    SeedRow,
    crossed_thresholds,
    refusal,
    usd_units,
    usd_value,
    window_end,
    window_start,
)
from proxy.price import Price, cost_of
from proxy.providers.base import Adapter, CallInfo, Usage, estimate_tokens, text_chars

log = logging.getLogger("tollway.limits")
#: Outcomes of requests that passed the limit check (and so count against limits).
ADMITTED = ("ok", "upstream_error", "timeout", "cancelled", "internal_error")


class LimitPlan(list):
    """The limits that apply to one identity, with what `reserve` and `settle` need precomputed:
    only the tightest limit per (scope, metric, window) can refuse (its `Check` is what the store
    gets), and budgets grouped by counter."""

    def __init__(self, limits: list[AppliedLimit]) -> None:
        super().__init__(limits)
        tightest: dict[tuple, AppliedLimit] = {}
        groups: dict[tuple, list[AppliedLimit]] = {}
        for lim in limits:
            key = (lim.per_user, lim.rule.metric, lim.rule.window)
            if key not in tightest or lim.limit_units < tightest[key].limit_units:
                tightest[key] = lim
            if lim.rule.metric == "usd":
                groups.setdefault((lim.scope, lim.rule.window), []).append(lim)
        self.tightest = list(tightest.values())
        self.checks = [lim.check for lim in self.tightest]
        self.budget_groups = list(groups.items())
        self.has_budget = bool(groups)  # a usd limit applies


def as_plan(limits: list[AppliedLimit]) -> LimitPlan:
    return limits if isinstance(limits, LimitPlan) else LimitPlan(limits)


class Limiter:
    def __init__(self, store: LimitStore, default_max_output_tokens: int,
                 on_alert: Callable[[Alert], None], on_refusal: Callable[[Refusal], None],
                 max_output_tokens: int = 131_072) -> None:
        self.store = store
        self._default_max_output = default_max_output_tokens
        self._max_output = max_output_tokens
        self._on_alert = on_alert
        self._on_refusal = on_refusal
        self._applicable: dict[tuple, list[AppliedLimit]] = {}
        self._applicable_for: PolicySet | None = None

    def applicable(self, policies: PolicySet, tenant: str, user: str, subjects: tuple[str, ...],
                   pseudonym: uuid.UUID) -> list[AppliedLimit]:
        """The limits bound to this identity's scopes, cached until the policy set changes."""
        if policies is not self._applicable_for or len(self._applicable) > 100_000:
            self._applicable, self._applicable_for = {}, policies
        key = (tenant, subjects, pseudonym)
        found = self._applicable.get(key)
        if found is None:
            tenant_scope, user_scope = Scope(tenant, None), Scope(tenant, pseudonym)
            found = self._applicable[key] = LimitPlan([
                AppliedLimit(rule, user_scope if per_user else tenant_scope)
                for rule, per_user in policies.policy.limits_for(tenant, user, subjects)])
        return found

    @staticmethod
    def has_budget(limits: list[AppliedLimit]) -> bool:
        """Whether a `usd` limit applies (an unpriced request cannot be counted against it)."""
        return as_plan(limits).has_budget

    def estimate(self, price: Price | None, adapter: Adapter, info: CallInfo, body: dict | None) -> Amounts:
        """The worst case. Tokens: estimated input plus the output cap (the client's, else the configured
        default). USD: the same input plus the client's cap or, without one, the longest reply the model
        can give (its context window or pricing.csv's max_output_tokens, at most [metering]
        max_output_tokens), so a budget holds even for requests that set no cap."""
        if not info.metered:
            return Amounts(requests=1)
        input_tokens = estimate_tokens(text_chars(body))
        client_cap = adapter.max_output_tokens(body)
        tokens = input_tokens + (client_cap or self._default_max_output)
        if price is None:
            return Amounts(1, tokens, Decimal(0))
        bound = client_cap or min(price.max_output_tokens or self._max_output, self._max_output)
        return Amounts(1, tokens, cost_of(price, Usage(input_tokens=input_tokens, output_tokens=bound)))

    async def reserve(self, limits: list[AppliedLimit], tenant: str, pseudonym: uuid.UUID, amounts: Amounts,
                      at: datetime) -> Reservation:
        scopes = (Scope(tenant, None), Scope(tenant, pseudonym))
        plan = as_plan(limits)
        result = await self.store.reserve(plan.checks, scopes, amounts, at)
        if isinstance(result, Denied):
            refused = refusal(plan.tightest, result)
            self._on_refusal(refused)
            rule = refused.limit.rule
            if rule.metric == "usd":  # refused at the budget: it is as good as fully spent
                await self._alert(Alert(refused.limit, 100, window_start(rule.window, at), refused.used))
            error = BudgetExceeded if rule.metric == "usd" else RateLimited
            raise error(refused.message(), retry_after=refused.retry_after_s)
        return result

    async def settle(self, reservation: Reservation, limits: list[AppliedLimit], event: Event) -> None:
        tokens = (event.input_tokens or 0) + (event.output_tokens or 0)
        actual = Amounts(1, tokens, event.cost_usd or Decimal(0))
        groups = as_plan(limits).budget_groups
        totals = await self.store.settle(reservation, actual)
        spent_units = usd_units(actual.usd)
        if not groups or not spent_units:
            return
        for (scope, window), budgets in groups:
            after = totals.get((scope, window))
            if after is None:
                continue  # that window rolled over meanwhile
            before = after - spent_units
            start = reservation.starts[WINDOWS.index(window)]
            for lim in budgets:
                for threshold in crossed_thresholds(before, after, lim.limit_units):
                    await self._alert(Alert(lim, threshold, start, usd_value(after)))

    async def unchecked(self, tenant: str, pseudonym: uuid.UUID | None, at: datetime) -> Reservation:
        """A reservation that holds nothing and checks nothing, so that usage the provider served without
        asking (a Realtime turn it began, a batch's results) is still counted when settled."""
        scopes = (Scope(tenant, None), Scope(tenant, pseudonym))
        return await self.store.reserve([], scopes, Amounts(0, 0, Decimal(0)), at)

    async def charge(self, event: Event) -> None:
        """Count usage that needed no admission (a batch's results, billed when they are read) against
        the tenant's and user's windows: no check (the provider already served it), no request counted."""
        reservation = await self.unchecked(event.tenant, event.user_pseudonym, event.ts)
        tokens = (event.input_tokens or 0) + (event.output_tokens or 0)
        await self.store.settle(reservation, Amounts(0, tokens, event.cost_usd or Decimal(0)))

    async def _alert(self, alert: Alert) -> None:
        """Sent once per (rule, scope, window, threshold), by whichever process crosses it first: the
        store remembers (a shared store for every process)."""
        key = _alert_id(alert.limit.rule.line, alert.limit.scope, alert.limit.rule.window, alert.window_start,
                        alert.threshold)
        until = window_end(alert.limit.rule.window, alert.window_start)
        if await self.store.first_alert(key, until):
            self._on_alert(alert)

    async def remember_alerts(self, keys: list[tuple]) -> None:
        """Alerts already recorded (from the audit log), so a restart does not repeat them."""
        for line, scope, window, start, threshold in keys:
            await self.store.first_alert(_alert_id(line, scope, window, start, threshold), window_end(window, start))


def _alert_id(line: int, scope: Scope, window: str, start: datetime, threshold: int) -> str:
    return f"{line}:{scope.tenant}:{scope.user or '-'}:{window}:{int(start.timestamp())}:{threshold}"


def alert_key(line: int, tenant: str, user: str | None, window: str, start: str, threshold: int) -> tuple:
    return (line, Scope(tenant, uuid.UUID(user) if user else None), window, datetime.fromisoformat(start), threshold)


#: Refusals recorded as upstream_error before any limit was reserved (limit store unavailable, every key
#: failing): 503 with no provider key tried. Not admitted, so not counted.
_NOT_ADMITTED = "NOT (outcome = 'upstream_error' AND status_code = 503 AND key_id IS NULL)"


def usage_rows(con: duckdb.DuckDBPyConnection, at: datetime) -> tuple[int, list[SeedRow]]:
    """What `events.duckdb` says was used in the windows containing `at`: (aggregates read, seed rows),
    the tenant's rows summed over its users."""
    read, totals = 0, {}
    cursor = con.cursor()  # its own cursor: a re-seed reads in a thread while the writer appends
    try:
        results = [(window, _usage(cursor, window_start(window, at))) for window in WINDOWS]
    finally:
        cursor.close()
    for window, result in results:
        for tenant, pseudonym, requests, tokens, usd in result:
            read += 1
            for scope in {Scope(tenant, None), Scope(tenant, pseudonym)}:
                old = totals.get((scope, window), (0, 0, 0))
                totals[scope, window] = (old[0] + requests, old[1] + int(tokens or 0),
                                         old[2] + usd_units(Decimal(usd or 0)))
    rows = [SeedRow(scope, window, window_start(window, at), *figures) for (scope, window), figures in totals.items()]
    return read, rows


def _usage(cursor: duckdb.DuckDBPyConnection, start: datetime) -> list[tuple]:
    return cursor.execute(
        "SELECT tenant, user_pseudonym, count(*), "
        "sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)), sum(coalesce(cost_usd, 0)) "
        f"FROM events WHERE ts >= ? AND tenant IS NOT NULL AND outcome IN ? AND {_NOT_ADMITTED} "
        "GROUP BY tenant, user_pseudonym", [start, list(ADMITTED)]).fetchall()


async def rebuild_counters(store: LimitStore, con: duckdb.DuckDBPyConnection, at: datetime,
                           source: str = "events") -> int:
    """Seed the current windows with what `events.duckdb` says was used in them, unless the store already
    holds `source`'s usage (a shared store that outlived this process); returns aggregates read."""
    read, rows = usage_rows(con, at)
    await store.seed(source, rows)
    return read


def alert_details(alert: Alert) -> dict:
    rule = alert.limit.rule
    return {"line": rule.line, "tenant": alert.limit.scope.tenant,
            "user_pseudonym": str(alert.limit.scope.user) if alert.limit.scope.user else None,
            "window": rule.window, "window_start": alert.window_start.isoformat(), "threshold": alert.threshold,
            "limit_usd": str(rule.limit), "spent_usd": str(alert.spent)}


def log_alert(alert: Alert) -> None:
    log.warning("budget alert %s", json.dumps({"event": "budget_alert", **alert_details(alert),
                                               "at": datetime.now(UTC).isoformat()}))
