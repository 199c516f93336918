"""Every request to a price: the operator's overrides, then the price book, then unpriced.

Resolution, in order: an override in `pricing.csv` naming the request's model (exactly, else by
glob, else the book's id for it, so that an override of `claude-sonnet-4-5` covers its dated
snapshots) -> the `genai-prices` book by the request's model -> the book by the model the
response names -> unpriced. An unpriced model costs `None` (unknown), never zero. Resolutions are cached
per (provider, model), so the request path pays a dict lookup and the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from pathlib import Path

from policy.files import Problem
from proxy.overrides import HEADER, ModelPrices, Overrides, load_overrides
from proxy.price import Price, cost_of
from proxy.pricebook import SOURCE, Book, has_time_of_day
from proxy.providers.base import Usage

__all__ = ["HEADER", "Book", "Price", "Prices", "Priced", "Resolution", "cost_of", "load_prices"]
OVERRIDE = "override"


@dataclass(frozen=True, slots=True)
class Priced:
    """What a request was billed at: the price, the model id it was priced as, and where it came from."""

    price: Price
    model: str
    source: str


class Resolution:
    """One model's prices: an override (falling back to the book where no override row is in force
    yet) or the book's. Prices are kept per (UTC day, tier): the request path pays a dict lookup."""

    __slots__ = ("model", "source", "_override", "_book", "_info", "_fallback", "_days", "_timed")

    def __init__(self, model: str, source: str, book: Book, info=None, override: ModelPrices | None = None,
                 fallback: Resolution | None = None) -> None:
        self.model, self.source = model, source
        self._book, self._info, self._override, self._fallback = book, info, override, fallback
        self._days: dict[tuple, Priced | None] = {}
        self._timed = info is not None and has_time_of_day(info)  # off-peak prices: by the minute, not the day

    def at(self, when: datetime, tier: str | None = None) -> Priced | None:
        """The price in force at `when` for a service tier, or None."""
        key = (when.date() if when.tzinfo is UTC else when.astimezone(UTC).date(), tier)
        if self._timed or key not in self._days:
            if len(self._days) > 1000:
                self._days.clear()
            self._days[key] = self._lookup(when, tier)
        return self._days[key]

    def _lookup(self, when: datetime, tier: str | None) -> Priced | None:
        if self._override is not None:
            price = self._override.price_at(when, tier)
            if price is not None:
                return Priced(price, self.model, self.source)
            return self._fallback.at(when, tier) if self._fallback is not None else None
        price = self._book.price_at(self._info, when, tier)
        return Priced(price, self.model, self.source) if price is not None else None


class Prices:
    def __init__(self, overrides: Overrides, book: Book | None = None) -> None:
        self.overrides = overrides
        self.book = book or shared_book()
        self._cache: dict[tuple[str, str, str | None], Resolution | None] = {}

    def resolve(self, provider: str, model: str, book_provider: str | None) -> Resolution | None:
        """The prices of `provider/model` (a gateway route and the provider's model id)."""
        key = (provider, model, book_provider)
        if key not in self._cache:
            if len(self._cache) > 50_000:  # model ids come from clients: bound the cache
                self._cache.clear()
            self._cache[key] = self._resolve(provider, model, book_provider)
        return self._cache[key]

    def _resolve(self, provider: str, model: str, book_provider: str | None) -> Resolution | None:
        info = self.book.find(book_provider, model) if book_provider else None
        in_book = Resolution(info.id, SOURCE, self.book, info) if info is not None else None
        override = self.find_override(provider, model, book_provider)
        if override is not None:
            name, _, versions = override
            return Resolution(name, OVERRIDE, self.book, override=versions, fallback=in_book)
        return in_book

    def find_override(self, provider: str, model: str, book_provider: str | None
                      ) -> tuple[str, str, ModelPrices] | None:
        """The override rows for a model, by its own id (exactly, else by glob), else by the book's id for
        it (a snapshot or alias of an overridden id): (the id priced, the model or glob as written, rows)."""
        found = self.overrides.find(provider, model)
        if found is not None:
            return model, *found
        info = self.book.find(book_provider, model) if book_provider else None
        if info is not None and info.id != model:
            found = self.overrides.find(provider, info.id)
            if found is not None:
                return info.id, *found
        return None

    def price(self, provider: str, model: str, book_provider: str | None, at: datetime, tier: str | None = None,
              response_model: str | None = None) -> Priced | None:
        """The price of one request: by its model, else by the model its response names."""
        for name in (model, response_model):
            found = self.resolve(provider, name, book_provider) if name else None
            priced = found.at(at, tier) if found is not None else None
            if priced is not None:
                return priced
        return None

    def cost(self, provider: str, model: str, book_provider: str | None, at: datetime, usage: Usage
             ) -> tuple[Decimal | None, Priced | None]:
        """(exact cost, what it was priced at); the cost is None when unpriced or nothing was used."""
        priced = self.price(provider, model, book_provider, at, usage.service_tier, usage.response_model)
        if priced is None or not usage.reported:
            return None, priced
        return cost_of(priced.price, usage), priced

    def models(self, provider: str, book_provider: str | None) -> list[str]:
        """Model ids of this route that have a price (overrides as written, and the book's ids)."""
        ids = {m.split("/", 1)[1] for m in self.overrides.models() if m.startswith(f"{provider}/")}
        return sorted(ids | set(self.book.model_ids(book_provider) if book_provider else ()))


@cache
def shared_book() -> Book:
    """One book per process: its data is immutable, and its caches serve every policy version."""
    return Book()


def load_prices(path: Path) -> tuple[Prices, list[Problem]]:
    """The overrides in `pricing.csv` over the price book; problems are reported, not raised."""
    overrides, problems = load_overrides(path)
    return Prices(overrides), problems
