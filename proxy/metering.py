"""Prices from `pricing.csv` and the exact cost of one request.

Prices are USD per million tokens, versioned by `effective_from` (a date, UTC): the row in force
at the request's start applies. An unpriced model costs `None` (unknown), never zero. A blank
cached-input or cache-write price falls back to the input price.
Cost is exact decimal arithmetic, rounded half-up to a nano-dollar (the events' DECIMAL(18,9)).
"""

from __future__ import annotations

import bisect
import csv
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation, localcontext
from pathlib import Path

from policy.files import Problem, csv_lines
from proxy.providers.base import Usage

HEADER = ["provider", "model", "effective_from", "input_usd_per_mtok", "output_usd_per_mtok",
          "cached_input_usd_per_mtok", "cache_write_usd_per_mtok"]
MILLION = Decimal(1_000_000)
NANO = Decimal("0.000000001")


@dataclass(frozen=True, slots=True)
class Price:
    effective_from: date
    input: Decimal
    output: Decimal
    cached_input: Decimal | None
    cache_write: Decimal | None


class PriceBook:
    def __init__(self, prices: dict[tuple[str, str], list[Price]]) -> None:
        self._prices = {k: sorted(v, key=lambda p: p.effective_from) for k, v in prices.items()}
        self._dates = {k: [p.effective_from for p in v] for k, v in self._prices.items()}

    def models(self) -> list[str]:
        """Every priced `provider/model`."""
        return sorted(f"{provider}/{model}" for provider, model in self._prices)

    def price_at(self, provider: str, model: str, at: datetime) -> Price | None:
        key = (provider, model)
        dates = self._dates.get(key)
        if not dates:
            return None
        index = bisect.bisect_right(dates, at.astimezone(UTC).date()) - 1
        return self._prices[key][index] if index >= 0 else None

    def cost(self, provider: str, model: str, at: datetime, usage: Usage) -> Decimal | None:
        price = self.price_at(provider, model, at)
        if price is None or usage.input_tokens is None and usage.output_tokens is None:
            return None
        return cost_of(price, usage)


def cost_of(price: Price, usage: Usage) -> Decimal:
    """Exact cost of one usage record under one price row.

    >>> p = Price(date(2025, 1, 1), Decimal("2.50"), Decimal("10"), Decimal("1.25"), None)
    >>> cost_of(p, Usage(input_tokens=1000, output_tokens=100, cached_input_tokens=400))
    Decimal('0.003000000')
    """
    with localcontext(prec=60):  # exact for any token count a request can name (10**27 included)
        return _cost(price, usage)


def _cost(price: Price, usage: Usage) -> Decimal:
    cached = usage.cached_input_tokens or 0
    written = usage.cache_write_tokens or 0
    fresh = max((usage.input_tokens or 0) - cached - written, 0)
    total = (fresh * price.input
             + cached * (price.cached_input if price.cached_input is not None else price.input)
             + written * (price.cache_write if price.cache_write is not None else price.input)
             + (usage.output_tokens or 0) * price.output)
    return (total / MILLION).quantize(NANO, rounding=ROUND_HALF_UP)


def load_pricebook(path: Path) -> tuple[PriceBook, list[Problem]]:
    """Parse `pricing.csv`; rows with problems are left out and reported."""
    problems: list[Problem] = []
    prices: dict[tuple[str, str], list[Price]] = {}
    if not path.exists():
        return PriceBook({}), [Problem(path.name, 0, "file is missing: every model will be unpriced", "warning")]
    try:
        rows = csv_lines(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        return PriceBook({}), [Problem(path.name, 0, f"cannot be read as UTF-8 CSV: {exc}")]
    if rows and rows[0][1] == HEADER:
        rows = rows[1:]
    elif rows:
        return PriceBook({}), [Problem(path.name, rows[0][0], "header must be " + ",".join(HEADER))]
    for line, fields in rows:
        price = _parse_row(fields)
        if isinstance(price, str):
            problems.append(Problem(path.name, line, price))
            continue
        versions = prices.setdefault((fields[0], fields[1]), [])
        if any(v.effective_from == price.effective_from for v in versions):
            problems.append(Problem(path.name, line, f"{fields[0]}/{fields[1]} has two prices from {fields[2]}"))
            continue
        versions.append(price)
    return PriceBook(prices), problems


def _parse_row(fields: list[str]) -> Price | str:
    if len(fields) != len(HEADER):
        return f"expected {len(HEADER)} columns, got {len(fields)}"
    provider, model, start, *amounts = fields
    if not provider or not model:
        return "provider and model must not be empty"
    try:
        effective = date.fromisoformat(start)
    except ValueError:
        return f"effective_from {start!r} is not a date like 2025-01-31"
    values = []
    for column, text in zip(HEADER[3:], amounts, strict=True):
        if not text and column.startswith("cache"):
            values.append(None)
            continue
        try:
            value = Decimal(text)
        except InvalidOperation:
            return f"{column} {text!r} is not a number"
        if not value.is_finite() or value < 0:
            return f"{column} must be a number >= 0"
        values.append(value)
    return Price(effective, *values)
