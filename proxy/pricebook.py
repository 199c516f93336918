"""The base price book: pydantic's `genai-prices` data, bundled with the installed package.

The package is pinned (pyproject.toml), so a deployment's prices change only when the operator
upgrades it; its data is never fetched at run time. It matches dated snapshots and aliases to a
model (`claude-sonnet-4-5-20250929` -> `claude-sonnet-4-5`), and carries effective dates,
long-context tiers, 5-minute and 1-hour cache writes, per-call fees and service-tier and batch
variants. Each lookup is resolved once and cached: the request path pays a dict lookup.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from proxy.price import Price

if TYPE_CHECKING:
    from genai_prices.types import ModelInfo

# The package itself (pydantic, its data) is imported on first use: commands that price nothing stay quick.
SOURCE = f"genai-prices {version('genai-prices')}"
#: The book's price keys -> `Price` fields (rates per million tokens; per-thousand fees).
_FIELDS = {
    "input_mtok": "input", "output_mtok": "output", "cache_read_mtok": "cached_input",
    "cache_write_mtok": "cache_write", "cache_write_1h_mtok": "cache_write_1h",
    "input_audio_mtok": "input_audio", "output_audio_mtok": "output_audio", "web_searches_kcount": "web_search_per_k",
}
_NEVER = datetime.min.date()


def book_provider(name: str, style: str, explicit: str | None = None) -> str | None:
    """The book's provider id for a gateway route: `price_provider` if set, Azure's for the azure
    style, else the route's own name where the book knows it (`gemini` is Google's)."""
    from genai_prices import data_snapshot
    from genai_prices.data_snapshot import find_provider_by_id

    wanted = explicit or ("azure" if style == "azure" else name)
    found = find_provider_by_id(data_snapshot.get_snapshot().providers, wanted)
    return found.id if found else None


#: Entries a cache keeps before it starts again: model ids come from clients, so no cache may grow with them.
_CACHE_LIMIT = 50_000


class Book:
    def __init__(self) -> None:
        from genai_prices import data_snapshot

        self._snapshot = data_snapshot.get_snapshot()
        self._providers: dict[str, Any] = {}
        self._models: dict[tuple[str, str], ModelInfo | None] = {}
        self._prices: dict[tuple, Price | None] = {}

    def find(self, provider: str, model: str) -> ModelInfo | None:
        """The book's model for a provider's model id (snapshot and alias ids included), or None.
        A fine-tune (`ft:…`) matches only a fine-tune price, never its base model's. Matched through the
        provider's own `find_model` (the snapshot's lookup caches every id it is asked about, unbounded)."""
        key = (provider, model)
        if key not in self._models:
            if len(self._models) > _CACHE_LIMIT:
                self._models.clear()
            found = self._provider(provider)
            info = found.find_model(model, all_providers=self._snapshot.providers) if found else None
            if info is not None and model.lower().startswith("ft:") != info.id.startswith("ft:"):
                info = None
            self._models[key] = info
        return self._models[key]

    def _provider(self, provider: str):
        from genai_prices.data_snapshot import find_provider_by_id

        if provider not in self._providers:
            self._providers[provider] = find_provider_by_id(self._snapshot.providers, provider)
        return self._providers[provider]

    def price_at(self, info: ModelInfo, at: datetime, tier: str | None) -> Price | None:
        """The model's price in force at `at`, for a service tier (`batch`: batch processing)."""
        timed = has_time_of_day(info)
        key = (info.id, at if timed else at.astimezone(UTC).date(), tier)
        if key not in self._prices:
            if len(self._prices) > _CACHE_LIMIT:
                self._prices.clear()
            context = {"processing": "batch"} if tier == "batch" else {"service_tier": tier} if tier else None
            self._prices[key] = to_price(info.get_prices(at, context).__dict__, context_window=info.context_window)
        return self._prices[key]

    def model_ids(self, provider: str) -> list[str]:
        found = self._provider(provider)
        return sorted(m.id for m in found.models) if found else []


def to_price(values: dict[str, Any], context_window: int | None = None) -> Price | None:
    """A book price (flat or with long-context tiers) as a `Price`; None without token prices. A model
    priced for input only (embeddings) bills output at 0; one whose output is priced only in kinds
    Tollway does not count (images, video) is left unpriced rather than half-priced."""
    from genai_prices.types import TieredPrices

    if values.get("input_mtok") is None:
        return None
    rates = {f: values.get(k) for k, f in _FIELDS.items()}
    if rates["output"] is None:
        if any(k.startswith("output_") and v is not None for k, v in values.items()):
            return None
        rates["output"] = Decimal(0)
    fee = values.get("requests_kcount")
    thresholds = sorted({t.start for v in rates.values() if isinstance(v, TieredPrices) for t in v.tiers})
    tiers = tuple((start, _flat(rates, fee, start, None)) for start in thresholds)
    return replace(_flat(rates, fee, -1, context_window), long_context=tiers)


def _flat(rates: dict[str, Any], fee: Any, above: int, max_output: int | None) -> Price:
    """Every rate at the tier that starts at `above` (-1: the base rates)."""
    flat = {field: _at_tier(value, above) for field, value in rates.items()}
    return Price(_NEVER, request_fee=_at_tier(fee, above) / 1000 if fee is not None else None,
                 max_output_tokens=max_output, **flat)


def _at_tier(value: Any, above: int) -> Decimal | None:
    if not hasattr(value, "tiers"):  # a flat price (or none): the same at every tier
        return value
    chosen = value.base
    for tier in value.tiers:
        if above >= tier.start:
            chosen = tier.price
    return chosen


def has_time_of_day(info: ModelInfo) -> bool:
    from genai_prices.types import TimeOfDateConstraint

    prices = info.prices if isinstance(info.prices, list) else []
    return any(isinstance(p.constraint, TimeOfDateConstraint) for p in prices)
