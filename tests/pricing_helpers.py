"""The operator's overrides on their own, as the pricing tests read them: `models()`, `price_at()`, `cost()`."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from pathlib import Path

from policy.files import Problem
from proxy.overrides import Overrides, Row, load_overrides
from proxy.price import Price, cost_of
from proxy.providers.base import Usage


class OverrideBook:
    def __init__(self, overrides: Overrides) -> None:
        self.overrides = overrides

    @classmethod
    def of(cls, prices: dict[tuple[str, str], list[Price]]) -> OverrideBook:
        return cls(Overrides([Row(0, p, m, "", 0, price) for (p, m), versions in prices.items() for price in versions]))

    def models(self) -> list[str]:
        return self.overrides.models()

    def price_at(self, provider: str, model: str, at: datetime, tier: str | None = None) -> Price | None:
        found = self.overrides.find(provider, model)
        return found[1].price_at(at, tier) if found else None

    def cost(self, provider: str, model: str, at: datetime, usage: Usage) -> Decimal | None:
        price = self.price_at(provider, model, at)
        if price is None or usage.input_tokens is None and usage.output_tokens is None:
            return None
        return cost_of(price, usage)


def load_pricebook(path: Path) -> tuple[OverrideBook, list[Problem]]:
    overrides, problems = load_overrides(path)
    return OverrideBook(overrides), problems
