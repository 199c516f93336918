"""The gateway's runtime state, assembled by `proxy.factory.build_gateway` from a deployment directory.

The factory does all the blocking work (reading settings, policy, prices, the control snapshot) and
picks the backends before the server accepts a request; `start()`/`stop()` own the async and
threaded resources. Nothing here is a module global.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from yarl import URL

from analytics.scheduler import ReportSchedule
from policy.loader import PolicyInvalid, PolicySet
from policy.watch import PolicyWatcher
from proxy.auth import ControlView, Identity
from proxy.control import ControlStore, ControlUnavailable, ProviderKey
from proxy.control_writer import ControlWriter
from proxy.crypto import Keyring
from proxy.errors import LimitStoreUnavailable
from proxy.events import Pseudonymizer
from proxy.jwt_auth import JwtVerifier, looks_like_jwt
from proxy.keys import KeyPools
from proxy.limiter import Limiter, alert_details, alert_key, log_alert, rebuild_counters, usage_rows
from proxy.limits import Alert, LimitStore, Refusal, Scope, SeedRow
from proxy.metrics import Metrics
from proxy.objects import ObjectRegistry
from proxy.overrides import is_glob
from proxy.pricebook import book_provider
from proxy.providers.base import Adapter
from proxy.providers.registry import adapter_for
from proxy.settings import ProviderSettings, Settings
from proxy.sinks import EventBackend, EventSink
from proxy.upstream import Upstream

log = logging.getLogger("tollway.gateway")
ADVICE_TTL_S = 60.0  # how long the limit store's advice (an evicting Redis) is reused before it is asked again


@dataclass(frozen=True, slots=True)
class ProviderRoute:
    name: str
    settings: ProviderSettings
    adapter: Adapter
    base_url: URL
    book_provider: str | None  # the price book's id for this provider, None where the book has none

    @property
    def credential_hint(self) -> str:
        where = " or ".join(f"`{h}`" for h in self.adapter.credential_headers)
        return f"Send your Tollway token (tw_...) in {where}."


class Gateway:
    def __init__(self, settings: Settings, keyring: Keyring, store: ControlStore, control: ControlView,
                 policies: PolicySet, *, limit_store: LimitStore, upstream: Upstream, events: EventBackend) -> None:
        self.settings = settings
        self.store = store  # event-loop side: start-up reads only
        self.control = control
        self.control_writer: ControlWriter | None = None
        self.objects: ObjectRegistry | None = None  # who created each provider object (from `start`)
        self.policies = policies  # replaced whole on reload; read once per request
        self.policy_error: str | None = None  # the last refused edit, until a valid set loads
        self._keyring = keyring
        self.pseudonymize = Pseudonymizer(keyring.pseudonym_key())
        self.routes = {
            name: ProviderRoute(name, p, adapter_for(p.style), URL(p.base_url),
                                book_provider(name, p.style, p.price_provider))
            for name, p in settings.providers.items()
        }
        self.upstream = upstream
        self.metrics = Metrics()
        self._configure_metrics(policies)
        self.limit_store = limit_store
        limit_store.instrument(self.metrics.limit_store_call)
        self.limiter = Limiter(self.limit_store, settings.limits.default_max_output_tokens, self._budget_alert,
                               self._limit_refusal, settings.metering.max_output_tokens)
        self.keys = KeyPools(control, self.metrics, self._persist_failing, limit_store.key_share())
        self.jwt = JwtVerifier(settings.auth.issuers, settings.data_dir) if settings.auth.issuers else None
        self.events = events  # the event sink's backend ([events] sink)
        self.recorder: EventSink | None = None
        self._tasks: list[asyncio.Task] = []
        self._advice: tuple[float, list[str]] | None = None
        self.reports: ReportSchedule | None = None

    async def start(self) -> None:
        self.recorder = self.events.open()
        await self._seed_limits()
        for advice in await self.advice():
            log.warning("%s", advice)
        self.control_writer = ControlWriter(self._open_control)
        self.objects = ObjectRegistry(self._open_control, self.control_writer)
        await self.upstream.start()
        await self.keys.start()
        build = self.events.report_builder()  # None with segments: the pipeline runs the schedule
        if build is not None:
            self.reports = ReportSchedule(build, self.settings.reports_dir, self.settings.pipeline.report_interval_s)
            self.reports.start()
        watcher = PolicyWatcher(self.settings.data_dir, lambda: self.policies, self._fresh_keys,
                                self._policy_loaded, self._policy_refused, self._policy_unchanged)
        self._tasks.append(asyncio.get_running_loop().create_task(watcher.run(), name="policy-watcher"))
        # Everything loaded so far lives as long as the server: keep it out of the collector's
        # way, and collect young objects less often (fewer pauses under load).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 50)

    async def advice(self) -> list[str]:
        """Settings that put limits at risk without stopping service (an evicting Redis), for the start log,
        /readyz and `tollway status`; asked of the store at most once a minute."""
        now = time.monotonic()
        if self._advice is None or now - self._advice[0] > ADVICE_TTL_S:
            self._advice = (now, await self.limit_store.advice())
        return self._advice[1]

    async def stop(self) -> None:
        """After in-flight requests finished: close upstream connections, flush every event."""
        if self.reports is not None:
            self.reports.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.upstream.close()
        await self.keys.close()
        await self.limit_store.close()
        if self.recorder:
            self.recorder.close()
        if self.control_writer is not None:
            await asyncio.to_thread(self.control_writer.close)
        if self.objects is not None:
            self.objects.close()
        self.control.close()
        self.events.close()

    def _open_control(self) -> ControlStore:
        return ControlStore(self.settings.control_target, self._keyring, actor="gateway")

    async def identify(self, credential: str | None, hint: str) -> Identity:
        """A gateway token (`tw_…`) or, when issuers are configured, a JWT of one (mapped through identities.csv)."""
        if credential and self.jwt is not None and looks_like_jwt(credential):
            return await self.jwt.identify(credential, self.policies.files.identities)
        return await self.control.authenticate(credential, hint)

    async def _seed_limits(self) -> None:
        """Counters for the current windows from the events so far (a shared store that already holds
        them is left alone), alerts already sent; a shared store that later loses its counters calls
        `_reseed_limits`. A limit store that does not answer yet does not stop the start: requests are
        refused (fail closed) until it does, and it is seeded then."""
        source = self._events_source()
        self.limit_store.attach(source, self._reseed_limits)
        try:
            with self.events.history() as history:
                rows = await rebuild_counters(self.limit_store, history, datetime.now(UTC), source)
            await self.limiter.remember_alerts(self._recorded_alerts())
        except LimitStoreUnavailable as exc:
            log.error("limit store unavailable at start (%s): requests are refused until it answers", exc)
            return
        log.info("limit counters rebuilt from %d (tenant, user) aggregates of the events so far", rows)

    async def _reseed_limits(self) -> None:
        """The shared store came back empty: flush pending events, read them all in a thread, seed once."""
        def read() -> list[SeedRow]:
            self.recorder.flush()
            with self.events.history() as history:
                return usage_rows(history, datetime.now(UTC))[1]
        rows = await asyncio.to_thread(read)
        await self.limit_store.seed(self._events_source(), rows)

    def _events_source(self) -> str:
        """Names the events a re-seed reads: every process that reads the same events seeds them once."""
        events = self.settings.events
        if events.sink == "segments":
            return f"segments:{events.segments_location(self.settings.data_dir)}"
        return f"duckdb:{socket.gethostname()}:{self.settings.events_db.resolve()}"

    def _budget_alert(self, alert: Alert) -> None:
        log_alert(alert)
        self.metrics.alert(alert)
        self._audit("budget.alert", alert.limit.scope.tenant, alert_details(alert))

    def _audit(self, action: str, target: str | None, details: dict) -> None:
        """Queued: the request that caused it never waits for control.db."""
        self.control_writer.submit(f"audit entry {action} {target}",
                                   lambda store: store.audit(action, target, details))

    async def render_metrics(self) -> bytes:
        """`/metrics`, with the gauges read from the live counters now (not when they last changed)."""
        with contextlib.suppress(LimitStoreUnavailable):  # the gauges keep their last values; /readyz says why
            self.metrics.budgets(await self._budget_ratios(datetime.now(UTC)))
        self.metrics.control_writes_pending.set(self.control_writer.pending if self.control_writer else 0)
        return self.metrics.render(self.recorder)

    async def _budget_ratios(self, now: datetime) -> list[tuple[str, str, int, float]]:
        """Spent share of each tenant-wide `usd` limit (a `*` line: of each tenant of tenants.csv)."""
        files = self.policies.files
        out = []
        for rule in files.limits:
            if rule.metric != "usd" or rule.subject != "tenant" or rule.limit <= 0:
                continue
            for tenant in (files.tenants if rule.tenant == "*" else (rule.tenant,)):
                spent = await self.limit_store.spent(Scope(tenant, None), "usd", rule.window, now)
                out.append((tenant, rule.window, rule.line, float(spent / rule.limit)))
        return out

    def _limit_refusal(self, refusal: Refusal) -> None:
        rule = refusal.limit.rule
        self.metrics.limit_refusals.labels(refusal.limit.scope.tenant, rule.metric, rule.window).inc()

    def _recorded_alerts(self) -> list[tuple]:
        """This month's budget alerts from the audit log, so a restart does not repeat them."""
        keys = []
        for entry in self.store.audit_entries(action="budget.alert", since=datetime.now(UTC).strftime("%Y-%m")):
            d = json.loads(entry["details"])
            keys.append(alert_key(d["line"], d["tenant"], d["user_pseudonym"], d["window"], d["window_start"],
                                  d["threshold"]))
        return keys

    def _persist_failing(self, key_id: str, reason: str) -> None:
        log.warning("key %s marked failing: %s", key_id, reason)
        self.control_writer.submit(f"key {key_id} marked failing",
                                   lambda store: store.mark_key_failing(key_id, reason))

    def _fresh_keys(self) -> dict[str, ProviderKey]:
        with contextlib.suppress(ControlUnavailable):  # PostgreSQL down: the cached keys stand (readyz says so)
            self.control.refresh()
        return self.control.keys

    def _configure_metrics(self, policies: PolicySet) -> None:
        """Metric labels may name only what configuration names (clients cannot grow /metrics)."""
        named = {rule.model_glob for rule in (*policies.files.access, *policies.files.routes)}
        named |= set(policies.prices.overrides.models())
        self.metrics.configure(set(policies.files.tenants), set(self.routes), {m for m in named if not is_glob(m)})
        self.metrics.policy(policies.hash)

    def _policy_loaded(self, new: PolicySet) -> None:
        self._configure_metrics(new)
        old, self.policies, self.policy_error = self.policies, new, None
        log.info("policy reloaded: version %s -> %s (%d warnings)", old.version, new.version, len(new.warnings))
        for problem in new.warnings:
            log.warning("%s", problem)
        self._audit("policy.reloaded", new.version, {"previous": old.version, "files": new.files.hashes})

    def _policy_unchanged(self) -> None:
        if self.policy_error is not None:
            log.info("policy files are back to version %s: the refused edit is gone", self.policies.version)
        self.policy_error = None

    def _policy_refused(self, exc: PolicyInvalid, hashes: dict[str, str]) -> None:
        shown = "; ".join(str(p) for p in exc.problems[:5])
        more = len(exc.problems) - 5
        self.policy_error = shown + (f"; and {more} more (`tollway policy check` lists all)" if more > 0 else "")
        log.error("policy edit refused, version %s stays in force: %s", self.policies.version, exc)
        self._audit("policy.refused", self.policies.version,
                         {"errors": [str(p) for p in exc.problems[:50]], "files": hashes})

