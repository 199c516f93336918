"""Prometheus metrics for `GET /metrics`, in a registry owned by one gateway (no globals).

Every label a client can influence is bounded by configuration, never by what requests say: a tenant
label is a tenant of `tenants.csv`, a provider one of `tollway.toml`, a model one named exactly in the
policy files or `pricing.csv`, or the price book's id it was billed as; anything else is `other`
(`-` when the request never named one). So the series count is at most (tenants + 2) × (providers + 2)
× (named models + book models used + 2) × outcomes, whatever clients send. Never a user id. Money here
is a float for Prometheus' sake; the exact figures are in events.duckdb.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from proxy.events import Event
from proxy.limits import Alert
from proxy.pricebook import SOURCE
from proxy.recorder import EventRecorder

OTHER = "other"

#: The exposition format's type without its charset: the web framework appends `charset=utf-8` itself.
CONTENT_TYPE = CONTENT_TYPE_LATEST.split("; charset")[0]
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tollway_requests", "Requests by outcome", ["tenant", "provider", "model", "outcome"],
                                registry=r)
        self.tokens = Counter("tollway_tokens", "Tokens metered", ["tenant", "provider", "model", "direction"],
                              registry=r)
        self.cost = Counter("tollway_cost_usd", "Cost metered, USD", ["tenant", "provider", "model", "billing_mode"],
                            registry=r)
        self.latency = Histogram("tollway_request_duration_seconds", "Whole-request latency", ["provider"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram("tollway_time_to_first_byte_seconds", "Time to the first response byte", ["provider"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.limit_refusals = Counter("tollway_limit_refusals", "Requests refused by a limit",
                                      ["tenant", "metric", "window"], registry=r)
        self.limit_store_latency = Histogram(
            "tollway_limit_store_seconds", "A shared limit store's call (Redis: reserve, settle) as the request "
            "waits for it", ["call"], buckets=_STORE_BUCKETS, registry=r)
        self._store_calls: dict[str, object] = {}
        self.key_failures = Counter("tollway_key_failures", "Provider keys that failed a request",
                                    ["key_id", "reason"], registry=r)
        self.budget_alerts = Counter("tollway_budget_alerts", "Budget thresholds crossed",
                                     ["tenant", "threshold"], registry=r)
        self.budget_spent_ratio = Gauge("tollway_budget_spent_ratio", "Spent share of a usd limit (tenant scope)",
                                        ["tenant", "window", "line"], registry=r)
        self.queue_depth = Gauge("tollway_event_queue_depth", "Events waiting to be written", registry=r)
        self.events_written = Gauge("tollway_events_written", "Events written since start", registry=r)
        self.events_dropped = Gauge("tollway_events_dropped", "Events dropped beyond the buffer bound "
                                    "(only with [events] fail_closed = false)", registry=r)
        self.events_rejected = Gauge("tollway_events_rejected", "Events the store refused, set aside in "
                                     "rejected-events.jsonl", registry=r)
        self.control_writes_pending = Gauge("tollway_control_writes_pending", "Audit entries and key health "
                                            "changes waiting for control.db (it is locked while this grows)",
                                            registry=r)
        self.event_store_up = Gauge("tollway_event_store_up", "1 when the last write to events.duckdb "
                                    "succeeded", registry=r)
        # One series, the set in force: `tollway_policy_info{hash="<first 12 hex of policy_hash>"} 1`.
        self.policy_info = Info("tollway_policy", "The policy set in force (hash: the first 12 hex digits of "
                                "/readyz policy_hash)", registry=r)
        self._series: dict[tuple, tuple] = {}
        self._tenants: frozenset[str] = frozenset()
        self._providers: frozenset[str] = frozenset()
        self._models: frozenset[str] = frozenset()

    def configure(self, tenants: set[str], providers: set[str], models: set[str]) -> None:
        """The label values configuration knows (called at start and on every policy reload)."""
        self._tenants, self._providers, self._models = frozenset(tenants), frozenset(providers), frozenset(models)

    def limit_store_call(self, call: str, seconds: float) -> None:
        """One call of a shared limit store (`call`: reserve or settle, a fixed set)."""
        child = self._store_calls.get(call)
        if child is None:
            child = self._store_calls[call] = self.limit_store_latency.labels(call)
        child.observe(seconds)

    def policy(self, set_hash: str) -> None:
        """The policy set now in force (at start and on every reload); replaces the previous series."""
        self.policy_info.info({"hash": set_hash[:12]})

    def labels(self, event: Event) -> tuple[str, str, str]:
        """(tenant, provider, model) as metric labels: known values, else `other`."""
        tenant, provider, model = event.tenant, event.provider, event.model
        tenant = "-" if tenant is None else tenant if tenant in self._tenants else OTHER
        provider = "-" if provider is None else provider if provider in self._providers else OTHER
        if model is None:
            return tenant, provider, "-"
        if model in self._models:
            return tenant, provider, model
        if event.price_source == SOURCE and provider != OTHER:  # billed as one of the book's (finite) ids
            return tenant, provider, f"{provider}/{event.priced_model}"
        return tenant, provider, OTHER

    def observe(self, event: Event) -> None:
        key = (*self.labels(event), event.outcome, event.billing_mode or "-")
        series = self._series.get(key)
        if series is None:  # label lookups once per combination, not per request
            tenant, provider, model, outcome, billing = key
            series = self._series[key] = (
                self.requests.labels(tenant, provider, model, outcome),
                self.tokens.labels(tenant, provider, model, "input"), self.tokens.labels(tenant, provider, model, "output"),
                self.cost.labels(tenant, provider, model, billing),
                self.latency.labels(provider), self.ttfb.labels(provider))
        requests, tokens_in, tokens_out, cost, latency, ttfb = series
        requests.inc()
        if event.input_tokens:
            tokens_in.inc(event.input_tokens)
        if event.output_tokens:
            tokens_out.inc(event.output_tokens)
        if event.cost_usd:
            cost.inc(float(event.cost_usd))
        if event.latency_ms is not None:
            latency.observe(event.latency_ms / 1000)
        if event.ttfb_ms is not None:
            ttfb.observe(event.ttfb_ms / 1000)

    def alert(self, alert: Alert) -> None:
        self.budget_alerts.labels(alert.limit.scope.tenant, str(alert.threshold)).inc()

    def budgets(self, ratios: list[tuple[str, str, int, float]]) -> None:
        """(tenant, window, limits.csv line, spent / limit) of every tenant-wide budget, as counted now."""
        self.budget_spent_ratio.clear()  # budgets removed from limits.csv disappear
        for tenant, window, line, ratio in ratios:
            self.budget_spent_ratio.labels(tenant, window, str(line)).set(ratio)

    def render(self, recorder: EventRecorder | None) -> bytes:
        if recorder is not None:
            self.queue_depth.set(recorder.queue_depth)
            self.events_written.set(recorder.written)
            self.events_dropped.set(recorder.dropped)
            self.events_rejected.set(recorder.rejected)
            self.event_store_up.set(0 if recorder.last_error else 1)
        return generate_latest(self.registry)
