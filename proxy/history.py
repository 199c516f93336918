"""Synthetic request history for the demo (and the dashboard's tests and benchmark).

Each event is decided by the deployment's real policy (access rule, key route, billing mode), priced
from its `pricing.csv`, pseudonymised with its key, marked `demo = true`, and written through the
same batched event writer the gateway uses. Only run it while no gateway holds `events.duckdb`.

Volumes follow a weekly rhythm (weekends are quiet), token counts and latencies are log-normal, and
a small share of calls fail upstream or hit a rate limit, so every report and chart has something
to show.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from policy.engine import Policy
from policy.files import load_policy_files
from proxy.control import ControlStore
from proxy.crypto import Keyring, load_master_key
from proxy.events import Event, Pseudonymizer
from proxy.metering import Prices, load_prices
from proxy.pricebook import book_provider
from proxy.providers.base import Usage
from proxy.recorder import EventRecorder, open_events_db
from proxy.settings import load_settings

ENDPOINTS = {"openai": "openai/chat.completions.create", "anthropic": "anthropic/messages.create",
             "gemini": "gemini/generate_content"}


@dataclass(frozen=True)
class Workload:
    """One tenant's traffic: who calls, which models (with weights), how much on a weekday."""

    tenant: str
    users: tuple[tuple[str, tuple[str, ...]], ...]  # (user id, roles)
    models: tuple[tuple[str, int], ...]  # ("provider/model", weight)
    requests_per_day: int


@dataclass(frozen=True)
class World:
    """What decides and prices each synthetic event: the deployment's own policy, keys and prices."""

    policy: Policy
    key_owner: dict[str, str | None]  # key id -> owning tenant (None: the operator)
    prices: Prices
    pseudonymize: Pseudonymizer
    book_providers: dict[str, str | None]  # gateway route -> the price book's provider id, as the gateway maps it

    @classmethod
    def of(cls, data_dir: Path) -> World:
        files = load_policy_files(data_dir)
        keyring = Keyring(load_master_key(data_dir))
        store = ControlStore(load_settings(data_dir).control_target, keyring, actor="history")
        try:
            owners = {k.key_id: k.owner_tenant for k in store.list_keys() if k.status == "active"}
        finally:
            store.close()
        prices, _ = load_prices(data_dir / "pricing.csv")
        routes = {name: book_provider(name, p.style, p.price_provider)
                  for name, p in load_settings(data_dir).providers.items()}
        return cls(Policy(files, data_dir / "policy" / "model.conf"), owners, prices,
                   Pseudonymizer(keyring.pseudonym_key()), routes)


def events(world: World, workloads: list[Workload], start: datetime, days: int, seed: int = 7) -> Iterator[Event]:
    """Every event of `days` days from `start` (UTC midnight), in time order per day."""
    rng = random.Random(seed)
    for offset in range(days):
        day = start + timedelta(days=offset)
        weekend = day.weekday() >= 5
        for load in workloads:
            volume = max(1, round(load.requests_per_day * (0.25 if weekend else 1.0) * rng.uniform(0.8, 1.2)))
            for _ in range(volume):
                yield _event(world, load, day + timedelta(seconds=rng.uniform(6 * 3600, 20 * 3600)), rng)


def _event(world: World, load: Workload, ts: datetime, rng: random.Random) -> Event:
    user, roles = rng.choice(load.users)
    model = rng.choices([m for m, _ in load.models], weights=[w for _, w in load.models])[0]
    provider, name = model.split("/", 1)
    event = Event(uuid.UUID(int=rng.getrandbits(128), version=4), ts, load.tenant,
                  world.pseudonymize(load.tenant, user), "token", provider, model, ENDPOINTS[provider],
                  streamed=rng.random() < 0.6, demo=True)
    decision = world.policy.decide(load.tenant, (user, *(f"role:{r}" for r in roles)), model)
    keys = [k for k in (decision.route.key_ids if decision.route else ()) if k in world.key_owner]
    if not decision.allowed or not keys:
        return _refused(event, "denied", 403, rng)
    event.key_id = keys[0]
    event.billing_mode = "byok" if world.key_owner[keys[0]] else "unified"
    roll = rng.random()
    if roll < 0.01:
        return _refused(event, "rate_limited", 429, rng)
    if roll < 0.025:
        event.outcome, event.status_code, event.attempts = "upstream_error", rng.choice((500, 503, 529)), 1
        event.latency_ms = event.upstream_ms = round(rng.lognormvariate(6.0, 0.5), 1)
        return event
    usage = Usage(input_tokens=int(rng.lognormvariate(7.2, 0.9)), output_tokens=int(rng.lognormvariate(5.6, 0.8)))
    if provider == "anthropic" and rng.random() < 0.4:
        usage.cached_input_tokens = int(usage.input_tokens * rng.uniform(0.3, 0.8))
    event.input_tokens, event.output_tokens = usage.input_tokens, usage.output_tokens
    event.cached_input_tokens = usage.cached_input_tokens
    event.usage_source, event.status_code, event.attempts = "reported", 200, 1
    event.cost_usd, priced = world.prices.cost(provider, name, world.book_providers.get(provider), ts, usage)
    if priced is not None:
        event.priced_model, event.price_source = priced.model, priced.source
    event.upstream_ms = round(rng.lognormvariate(7.0, 0.6), 1)
    event.latency_ms = round(event.upstream_ms + rng.uniform(0.3, 2.0), 1)
    event.ttfb_ms = round(event.upstream_ms * rng.uniform(0.05, 0.3), 1) if event.streamed else event.latency_ms
    return event


def _refused(event: Event, outcome: str, status: int, rng: random.Random) -> Event:
    event.outcome, event.status_code, event.key_id, event.billing_mode = outcome, status, None, None
    event.latency_ms = round(rng.uniform(0.2, 1.5), 2)
    return event


def write_history(data_dir: Path, workloads: list[Workload], days: int, now: datetime | None = None,
                  seed: int = 7, progress=None) -> int:
    """Write `days` days of history ending yesterday (UTC) into `events.duckdb`; return the count.

    `progress(done)` is called every 10,000 events when given."""
    today = (now or datetime.now(UTC)).astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    world, written = World.of(data_dir), 0
    con = open_events_db(data_dir / "events.duckdb")
    try:  # nested, so that an interruption at any point closes exactly what was opened
        recorder = EventRecorder(con, flush_interval_ms=200, batch_size=10_000)
        try:
            for event in events(world, workloads, today - timedelta(days=days), days, seed):
                recorder.record(event)
                written += 1
                if progress and written % 10_000 == 0:
                    progress(written)
        finally:
            recorder.close()
    finally:
        con.close()
    return written
