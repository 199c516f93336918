"""Admission: identify → decide → limit, as small steps that every transport (HTTP, WebSocket) calls.

    credential ─identify()─▶ Identity (tenant checked; the event gets tenant, pseudonym, auth method)
               ─check_operation()─▶ operations.csv
    model      ─key_pool()─▶ access.csv decision and the route's keys
               ─reserve()─▶ the worst case held against every limit that applies
    response   ─finish()─▶ metered, limits settled, event recorded (exactly once)

Each step raises the `TollwayError` the client gets; messages are the HTTP pipeline's, word for word,
so a refusal reads the same whatever the transport.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from proxy.errors import InternalError, OperationDenied, PolicyDenied, StoreUnavailable, UnknownTenant
from proxy.events import Event
from proxy.meter import meter, pricing_model, refuse_unpriced

if TYPE_CHECKING:
    from policy.loader import PolicySet
    from proxy.auth import Identity
    from proxy.control import ProviderKey
    from proxy.forward import Call
    from proxy.gateway import Gateway, ProviderRoute
    from proxy.limits import AppliedLimit, Reservation
    from proxy.providers.base import CallInfo

log = logging.getLogger("tollway.gateway")
STORE_UNAVAILABLE = ("Tollway cannot record usage right now (its event store cannot be written) and refuses "
                     "requests rather than serve unmetered traffic. Retry shortly; operators: see the gateway log "
                     "and /readyz (disk space and permissions of events.duckdb).")


def check_store(gw: Gateway) -> None:
    """Refuse before anything else when events cannot be recorded (fail closed)."""
    if not gw.recorder.accepting:
        raise StoreUnavailable(STORE_UNAVAILABLE)


async def identify(gw: Gateway, route: ProviderRoute, credential: str | None,
                   event: Event) -> tuple[Identity, PolicySet]:
    """The caller and the policy set that governs it; the event gets its tenant, pseudonym and auth method."""
    identity = await gw.identify(credential, route.credential_hint)
    policies = gw.policies  # one policy set for the whole request, even across a reload
    event.auth_method, event.identity_source = identity.auth_method, identity.identity_source
    if identity.tenant not in policies.files.tenants:  # recorded with no tenant: it names none of ours
        raise UnknownTenant(f"The credential names tenant {identity.tenant!r}, which is not a tenant of this gateway. "
                            "Ask your Tollway operator to add it to tenants.csv, or for a credential of your tenant.")
    event.tenant = identity.tenant
    event.user_pseudonym = gw.pseudonymize(identity.tenant, identity.user)
    return identity, policies


def check_operation(policies: PolicySet, identity: Identity, operation: str) -> None:
    """operations.csv: `operation` is `provider/operation`, e.g. `openai/responses.create`."""
    if not policies.policy.decide_operation(identity.tenant, identity.subjects, operation).allowed:
        raise OperationDenied(f"Tenant {identity.tenant!r} may not call {operation!r}. Ask your governance lead "
                              "to allow it in policy/operations.csv.")


def key_pool(gw: Gateway, policies: PolicySet, route: ProviderRoute, identity: Identity,
             model: str) -> list[ProviderKey]:
    """access.csv's decision for `model` (`provider/model`), then the keys its route names, in order."""
    decision = policies.policy.decide(identity.tenant, identity.subjects, model)
    if not decision.allowed:
        raise PolicyDenied(f"Tenant {identity.tenant!r} may not use model {model!r}. "
                           "Ask your governance lead to allow it in policy/access.csv.")
    return gw.keys.pool(decision.route, identity.tenant, route.name, model)


async def reserve(gw: Gateway, policies: PolicySet, route: ProviderRoute, identity: Identity, event: Event,
                  info: CallInfo, body: dict | None) -> tuple[Reservation, list[AppliedLimit]]:
    """Hold the call's worst case against every limit that applies (429 when one would be crossed).
    Under a `usd` limit an unpriced model is refused (unless `[metering] unpriced = "allow"`)."""
    limits = gw.limiter.applicable(policies, identity.tenant, identity.user, identity.subjects, event.user_pseudonym)
    priced = None
    if info.metered and gw.limiter.has_budget(limits):  # only money limits need the price before the call
        priced = policies.prices.price(route.name, pricing_model(route, info.model), route.book_provider, event.ts,
                                       info.service_tier)
        if priced is None and gw.settings.metering.unpriced == "refuse":
            raise refuse_unpriced(event.model)
    amounts = gw.limiter.estimate(priced.price if priced else None, route.adapter, info, body)
    reservation = await gw.limiter.reserve(limits, identity.tenant, event.user_pseudonym, amounts, event.ts)
    return reservation, limits


async def unreserved(gw: Gateway, policies: PolicySet, identity: Identity,
                     event: Event) -> tuple[Reservation, list[AppliedLimit]]:
    """Nothing held, but counted when settled: for usage the provider started itself (a Realtime turn
    its voice detection began), which no limit could refuse beforehand."""
    limits = gw.limiter.applicable(policies, identity.tenant, identity.user, identity.subjects, event.user_pseudonym)
    return await gw.limiter.unchecked(identity.tenant, event.user_pseudonym, event.ts), limits


def conclude(gw: Gateway, route: ProviderRoute, call: Call) -> None:
    """Meter and record the call's event, once: right before the last byte of its answer is sent (the
    HTTP path calls this from its `send`), so an answered request has its event in the recorder, and
    with a spool on disk, even if the process is killed the next instant. Settling limits follows."""
    if call.concluded:
        return
    call.concluded = True
    event = call.event
    event.latency_ms = call.elapsed_ms()
    if call.upstream_started is not None and call.response_started:
        event.upstream_ms = round((time.perf_counter() - call.upstream_started) * 1000, 3)
    try:
        meter(call, route)
    except Exception:
        log.exception("request %s: metering failed; its event is recorded as it stands", event.event_id)
    if event.status_code == 0:  # nothing answered the client: never recorded as a success
        event.status_code, event.outcome = InternalError.status, "internal_error"
    if call.recorded:
        gw.recorder.record(event)
    gw.metrics.observe(event)


async def finish(gw: Gateway, route: ProviderRoute, call: Call) -> None:
    """Once for every call, however it ended: its event concluded (if its answer did not already), then
    its limits settled with the real usage."""
    conclude(gw, route, call)
    if call.reservation is None:
        return
    try:
        await gw.limiter.settle(call.reservation, call.limits, call.event)
    except Exception:
        log.exception("request %s: settling its limits failed", call.event.event_id)
