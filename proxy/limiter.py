"""Limits for one request: what applies, the worst-case reservation, the settlement, budget alerts,
and rebuilding the current windows from `events.duckdb` after a restart."""

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
    LimitStore,
    MemoryLimitStore,
    Refusal,
    Reservation,
    Scope,
    crossed_thresholds,
    usd_units,
    usd_value,
    window_start,
)
from proxy.price import Price, cost_of
from proxy.providers.base import Adapter, CallInfo, Usage, estimate_tokens, text_chars

log = logging.getLogger("tollway.limits")
#: Outcomes of requests that passed the limit check (and so count against limits).
ADMITTED = ("ok", "upstream_error", "timeout", "cancelled", "internal_error")


class LimitPlan(list):
    """The limits that apply to one identity, with what `reserve` and `settle` need precomputed:
    only the tightest limit per (scope, metric, window) can refuse, and budgets grouped by counter."""

    def __init__(self, limits: list[AppliedLimit]) -> None:
        super().__init__(limits)
        tightest: dict[tuple, AppliedLimit] = {}
        groups: dict[tuple, list[AppliedLimit]] = {}
        for lim in limits:
            key = (lim.per_user, lim.slot)
            if key not in tightest or lim.limit_units < tightest[key].limit_units:
                tightest[key] = lim
            if lim.rule.metric == "usd":
                groups.setdefault((lim.scope, lim.rule.window), []).append(lim)
        self.checks = list(tightest.values())
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
        self._alerted: set[tuple] = set()
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
        result = await self.store.reserve(as_plan(limits).checks, scopes, amounts, at)
        if isinstance(result, Refusal):
            self._on_refusal(result)
            rule = result.limit.rule
            if rule.metric == "usd":  # refused at the budget: it is as good as fully spent
                self._alert(Alert(result.limit, 100, window_start(rule.window, at), result.used))
            error = BudgetExceeded if result.limit.rule.metric == "usd" else RateLimited
            raise error(result.message(), retry_after=result.retry_after_s)
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
            for lim in budgets:
                for threshold in crossed_thresholds(before, after, lim.limit_units):
                    self._alert(Alert(lim, threshold, window_start(window, reservation.at), usd_value(after)))

    async def charge(self, event: Event) -> None:
        """Count usage that needed no admission (a batch's results, billed when they are read) against
        the tenant's and user's windows: no check (the provider already served it), no request counted."""
        scopes = (Scope(event.tenant, None), Scope(event.tenant, event.user_pseudonym))
        reservation = await self.store.reserve([], scopes, Amounts(0, 0, Decimal(0)), event.ts)
        tokens = (event.input_tokens or 0) + (event.output_tokens or 0)
        await self.store.settle(reservation, Amounts(0, tokens, event.cost_usd or Decimal(0)))

    def _alert(self, alert: Alert) -> None:
        key = (alert.limit.rule.line, alert.limit.scope, alert.limit.rule.window, alert.window_start, alert.threshold)
        if key in self._alerted:
            return
        if len(self._alerted) > 50_000:  # forget alerts of windows that are over
            month = window_start("month", datetime.now(UTC))
            self._alerted = {k for k in self._alerted if k[3] >= month}
        self._alerted.add(key)
        self._on_alert(alert)

    def remember_alerts(self, keys: list[tuple]) -> None:
        """Alerts already recorded (from the audit log), so a restart does not repeat them."""
        self._alerted.update(keys)


def alert_key(line: int, tenant: str, user: str | None, window: str, start: str, threshold: int) -> tuple:
    return (line, Scope(tenant, uuid.UUID(user) if user else None), window, datetime.fromisoformat(start), threshold)


def rebuild_counters(store: MemoryLimitStore, con: duckdb.DuckDBPyConnection, at: datetime) -> int:
    """Seed the current windows with what `events.duckdb` says was used in them; returns rows read."""
    rows = 0
    for window in WINDOWS:
        start = window_start(window, at)
        result = con.execute(
            "SELECT tenant, user_pseudonym, count(*), "
            "sum(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)), sum(coalesce(cost_usd, 0)) "
            "FROM events WHERE ts >= ? AND tenant IS NOT NULL AND outcome IN ? "
            "GROUP BY tenant, user_pseudonym", [start, list(ADMITTED)]).fetchall()
        for tenant, pseudonym, requests, tokens, usd in result:
            rows += 1
            for scope in {Scope(tenant, None), Scope(tenant, pseudonym)}:
                for metric, value in (("requests", requests), ("tokens", tokens), ("usd", usd)):
                    store.seed(scope, metric, window, start, Decimal(value or 0))
    return rows


def alert_details(alert: Alert) -> dict:
    rule = alert.limit.rule
    return {"line": rule.line, "tenant": alert.limit.scope.tenant,
            "user_pseudonym": str(alert.limit.scope.user) if alert.limit.scope.user else None,
            "window": rule.window, "window_start": alert.window_start.isoformat(), "threshold": alert.threshold,
            "limit_usd": str(rule.limit), "spent_usd": str(alert.spent)}


def log_alert(alert: Alert) -> None:
    log.warning("budget alert %s", json.dumps({"event": "budget_alert", **alert_details(alert),
                                               "at": datetime.now(UTC).isoformat()}))
