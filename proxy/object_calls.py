"""What a call and its answer say about provider objects: the id a create call returned (now the caller's
tenant's), a list filtered to that tenant, a batch's result files or inline results (metered once), and
provider URLs (an Anthropic `results_url`, a Gemini upload URL) pointed at the gateway."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from proxy import objects
from proxy.batch_results import answer_of, result_events
from proxy.providers.base import json_encode

if TYPE_CHECKING:
    from proxy.forward import Call
    from proxy.gateway import Gateway, ProviderRoute


async def observe(gw: Gateway, route: ProviderRoute, call: Call, payload: Any) -> bytes | None:
    """Record the object a create call made; filter a list to the caller's tenant (its new body);
    make a batch's result files the batch's owner's."""
    rules, operation = call.objects, call.event.endpoint.partition("/")[2]
    if rules.creates_object(operation, call.body):
        created = rules.created_id(operation, payload)
        if created is not None:
            record_created(gw, route, call, created)
    items_key = rules.list_items(operation)
    rewritten = rules.url_fields and objects.rewrite_urls(payload, rules.url_fields, items_key,
                                                          str(route.base_url).rstrip("/"), f"{call.origin}/{route.name}")
    if items_key is not None:
        return json_encode(await objects.filter_list(gw.objects, route.name, items_key, payload, call.event.tenant))
    if call.owner is not None and call.owner.kind == "batch" and isinstance(payload, dict):
        for name in rules.result_files:
            file_id = objects.object_id(payload.get(name))
            if file_id is not None:
                gw.objects.record(route.name, file_id, replace(call.owner, kind=objects.BATCH_RESULTS))
        inline = rules.results_inline(payload)
        if inline:
            await meter_results(gw, route, call, [answer_of(r, i) for i, r in enumerate(inline) if isinstance(r, dict)])
    return json_encode(payload) if rewritten else None


def record_created(gw: Gateway, route: ProviderRoute, call: Call, object_id: str) -> None:
    """The object a create call made is the caller's tenant's, made with the key that served the call."""
    kind = call.objects.kind_of(call.event.endpoint.partition("/")[2])
    gw.objects.record(route.name, object_id, objects.Owner(call.event.tenant, call.event.user_pseudonym,
                                                           call.event.key_id, kind))


def reads_results(call: Call) -> bool:
    """A download of batch results that Tollway meters: the batch's result file, or Anthropic's results."""
    owner, operation = call.owner, call.event.endpoint.partition("/")[2]
    return owner is not None and ((owner.kind == objects.BATCH_RESULTS and operation == "files.content")
                                  or operation == call.objects.results)


async def meter_results(gw: Gateway, route: ProviderRoute, call: Call, answers: list) -> None:
    """One event per result of the batch the call is about, by the first caller ever to read them all."""
    if not await gw.objects.claim_results(route.name, call.path_id):
        return  # read before: metered then
    for event in result_events(answers, route.adapter, route.name, call.path_id, call.owner,
                               call.event.billing_mode, call.policies.prices, route.book_provider):
        await gw.limiter.charge(event)
        gw.recorder.record(event)
        gw.metrics.observe(event)


def point_at_gateway(headers: list[tuple[bytes, bytes]], names: tuple[str, ...], route: ProviderRoute,
                     origin: str) -> list[str]:
    """Rewrite response headers that send the client to the provider's host (a resumable upload's URL);
    returns the URLs rewritten, as the provider sent them."""
    upstream = str(route.base_url).rstrip("/").encode()
    public = f"{origin}/{route.name}".encode()
    wanted, rewritten = {n.encode() for n in names}, []
    for i, (name, value) in enumerate(headers):
        if name in wanted and value.startswith(upstream):
            headers[i] = (name, public + value[len(upstream):])
            rewritten.append(value.decode("latin-1"))
    return rewritten


def record_session(gw: Gateway, route: ProviderRoute, call: Call, url: str) -> None:
    """An upload session the gateway handed out belongs to the caller, like any object."""
    found = parse_qs(urlsplit(url).query).get(call.objects.session_param or "")
    if found:
        gw.objects.record(route.name, found[0], objects.Owner(call.event.tenant, call.event.user_pseudonym,
                                                              call.event.key_id, objects.UPLOAD_SESSION))
