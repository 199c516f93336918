"""Metering one request: the usage to bill, its price and exact cost, written onto the event.

Admission resolves the request's model to a price before anything is forwarded (an unpriced
model under a usd limit is refused there); when the response is in, `meter` bills the usage the
provider reported (or an estimate of the missing side), at the tier it reported, falling back to
the model the response names when the request's own model has no price.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from proxy.errors import ModelUnpriced
from proxy.providers.base import Usage, estimate_tokens, text_chars

if TYPE_CHECKING:
    from proxy.events import Event
    from proxy.forward import Call
    from proxy.gateway import ProviderRoute
    from proxy.metering import Prices


def pricing_model(route: ProviderRoute, model: str) -> str:
    """The model id to price: an Azure deployment's model where `tollway.toml` names it."""
    return route.settings.deployments.get(model, model)


def refuse_unpriced(model: str) -> ModelUnpriced:
    return ModelUnpriced(
        f"Model {model!r} has no price, and a USD budget applies to this request: Tollway will not serve "
        "usage it cannot count against the budget. Ask your operator to price it in pricing.csv "
        "(`tollway pricing show` and `tollway pricing check` help), or to upgrade the price book.")


def meter(call: Call, route: ProviderRoute) -> None:
    """Fill the event's usage, price and cost (once per request)."""
    if call.metered:
        return
    call.metered = True
    event = call.event
    usage, event.usage_source = metered_usage(call)
    if event.usage_source == "none":
        return
    price_usage(event, usage, call.policies.prices, route.name, pricing_model(route, call.info.model),
                route.book_provider)


def price_usage(event: Event, usage: Usage, prices: Prices, provider: str, model: str,
                book_provider: str | None) -> None:
    """Write the usage, its exact cost and what it was priced at onto the event."""
    event.input_tokens, event.output_tokens = usage.input_tokens, usage.output_tokens
    event.cached_input_tokens, event.cache_write_tokens = usage.cached_input_tokens, usage.cache_write_tokens
    event.reasoning_tokens, event.cache_write_1h_tokens = usage.reasoning_tokens, usage.cache_write_1h_tokens
    event.input_audio_tokens, event.output_audio_tokens = usage.input_audio_tokens, usage.output_audio_tokens
    event.web_search_calls, event.service_tier = usage.web_search_calls, usage.service_tier
    event.cost_usd, priced = prices.cost(provider, model, book_provider, event.ts, usage)
    if priced is not None:
        event.priced_model, event.price_source = priced.model, priced.source


def metered_usage(call: Call) -> tuple[Usage, str]:
    """The usage to bill and its source: as reported, with any missing side estimated.

    A call that produced a response (even one cut short) is metered; a side the provider did not
    report (no usage at all, or a stream that ended before its final usage event) is estimated from
    the request's text and the text relayed, and the whole record is then marked `estimated`.
    """
    usage, info = call.usage, call.info
    if info is None or not info.metered or call.estimate_output_chars is None:
        return usage, "reported" if usage.reported else "none"
    if usage.input_tokens is not None and usage.output_tokens is not None:
        return usage, "reported"
    filled = replace(usage)
    if filled.input_tokens is None:
        filled.input_tokens = estimate_tokens(text_chars(call.body))
    if filled.output_tokens is None:
        filled.output_tokens = estimate_tokens(call.estimate_output_chars)
    return filled, "estimated"
