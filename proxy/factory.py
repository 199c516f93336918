"""`build_gateway(settings)`: the one place that picks the gateway's backends and assembles it.

Everything blocking happens here, before the server accepts a request: the master key, the control
store and its snapshot, the policy set. Backends are chosen from settings and reached through small
interfaces, so scaling out is a wiring change:

    [limits] store = "memory" | "redis://..."   ─▶ LimitStore (proxy.limits)
    [events] sink = "duckdb" | "segments"       ─▶ EventBackend (proxy.sinks)
    upstream client (aiohttp)                   ─▶ Upstream (proxy.upstream)
    [control] url = "control.db" | "postgresql://..."  ─▶ ControlStore (proxy.control)
"""

from __future__ import annotations

import logging

from policy.loader import PolicyInvalid, load_policy_set
from proxy.auth import ControlView
from proxy.control import ControlStore, ControlUnavailable
from proxy.crypto import Keyring, load_master_key
from proxy.errors import StartupError
from proxy.gateway import Gateway
from proxy.limits import LimitStore
from proxy.settings import LimitSettings, Settings
from proxy.sinks import EventBackend
from proxy.stores.memory import MemoryLimitStore
from proxy.upstream import Upstream

log = logging.getLogger("tollway.gateway")


def build_gateway(settings: Settings) -> Gateway:
    """Read and validate everything; raise `StartupError` naming the first problems."""
    keyring = Keyring(load_master_key(settings.data_dir))
    try:
        store = ControlStore(settings.control_target, keyring, actor="gateway")
        control = ControlView(store, ControlStore(settings.control_target, keyring, actor="gateway"), keyring)
    except ControlUnavailable as exc:  # at start there is no snapshot to serve from
        raise StartupError(f"{exc}\nstart PostgreSQL (or fix [control] url in tollway.toml) and start again") from exc
    try:
        policies = load_policy_set(settings.data_dir, control.keys)
    except PolicyInvalid as exc:
        raise StartupError(f"{exc}\nfix them (`tollway policy check` lists them) and start again") from exc
    for problem in policies.warnings:
        log.warning("%s", problem)
    return Gateway(settings, keyring, store, control, policies, limit_store=limit_store_for(settings.limits),
                   upstream=Upstream(), events=event_backend_for(settings))


def event_backend_for(settings: Settings) -> EventBackend:
    """The event sink `[events] sink` names: `events.duckdb` in this process, or sealed segments."""
    if settings.events.sink == "segments":
        from proxy.sinks.segment_events import SegmentEvents

        return SegmentEvents(settings)
    from proxy.sinks.duckdb_sink import DuckDBEvents

    return DuckDBEvents(settings)


def limit_store_for(limits: LimitSettings) -> LimitStore:
    """The limit store `[limits] store` names: this process's memory, or Redis shared by every process
    (imported only then, so the default start never loads the Redis client)."""
    if limits.store == "memory":
        return MemoryLimitStore()
    from proxy.stores.redis_limits import RedisLimitStore, shown

    try:
        return RedisLimitStore(limits.store)
    except ValueError as exc:  # a URL redis-py cannot read
        raise StartupError(f"[limits] store = {shown(limits.store)!r}: {exc}") from exc
