"""The operator's price overrides: `pricing.csv`.

Rows are USD per million tokens, versioned by `effective_from` (a UTC date: the row in force at
the request's start applies). The first seven columns are required and in this order; the
optional columns after them may come in any order, named in the header:

    provider,model,effective_from,input_usd_per_mtok,output_usd_per_mtok,cached_input_usd_per_mtok,
    cache_write_usd_per_mtok[,cache_write_1h_usd_per_mtok][,input_audio_usd_per_mtok]
    [,output_audio_usd_per_mtok][,web_search_usd_per_kcall][,request_usd][,service_tier]
    [,prompt_tokens_above][,max_output_tokens]

`model` is a model id or a glob (`*`, `?`). A row with a `service_tier` applies only when the
response reports that tier (`batch` for batch jobs); a row with `prompt_tokens_above` is the
long-context tier of the row for the same model, date and tier without it.
"""

from __future__ import annotations

import bisect
import csv
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

from policy.files import Bounds, Problem, csv_lines, glob_regex
from proxy.price import Price

HEADER = ["provider", "model", "effective_from", "input_usd_per_mtok", "output_usd_per_mtok",
          "cached_input_usd_per_mtok", "cache_write_usd_per_mtok"]
#: Optional rate columns -> the `Price` field each fills.
RATE_COLUMNS = {
    "cached_input_usd_per_mtok": "cached_input", "cache_write_usd_per_mtok": "cache_write",
    "cache_write_1h_usd_per_mtok": "cache_write_1h", "input_audio_usd_per_mtok": "input_audio",
    "output_audio_usd_per_mtok": "output_audio", "web_search_usd_per_kcall": "web_search_per_k",
    "request_usd": "request_fee",
}
#: Columns a header may add after the seven of `HEADER`, in any order.
OPTIONAL = [column for column in RATE_COLUMNS if column not in HEADER] + ["service_tier", "prompt_tokens_above",
                                                                       "max_output_tokens"]
_NUMBER_COLUMNS = ("prompt_tokens_above", "max_output_tokens")
#: A rate: USD per million tokens, per thousand web searches or per request.
RATE = Bounds(0, 1_000_000)
#: prompt_tokens_above and max_output_tokens (0 is the base row / no bound of its own, as ever).
TOKEN_COUNT = Bounds(0, 100_000_000, whole=True)


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    provider: str
    model: str
    tier: str  # "" = any tier
    above: int  # 0 = the base price; else the long-context tier for prompts above this many tokens
    price: Price


class ModelPrices:
    """Every version of one override key (provider, model or glob), per service tier."""

    def __init__(self, rows: list[Row]) -> None:
        tiers: dict[str, dict[date, Price]] = {}
        for row in sorted(rows, key=lambda r: r.above):
            by_date = tiers.setdefault(row.tier, {})
            base = by_date.get(row.price.effective_from)
            if row.above == 0 or base is None:
                by_date[row.price.effective_from] = row.price
            else:
                by_date[row.price.effective_from] = replace(base, long_context=(*base.long_context,
                                                                                (row.above, row.price)))
        self._versions = {tier: sorted(by_date.items()) for tier, by_date in tiers.items()}
        self._dates = {tier: [d for d, _ in versions] for tier, versions in self._versions.items()}

    def price_at(self, at: datetime, tier: str | None) -> Price | None:
        """The tier's own row in force, else the base row in force, else None."""
        day = at.astimezone(UTC).date()
        for key in (tier, "") if tier else ("",):
            dates = self._dates.get(key)
            index = bisect.bisect_right(dates, day) - 1 if dates else -1
            if index >= 0:
                return self._versions[key][index][1]
        return None


class Overrides:
    """Exact model names win over globs; among globs the first in file order wins."""

    def __init__(self, rows: list[Row]) -> None:
        grouped: dict[tuple[str, str], list[Row]] = {}
        for row in rows:
            grouped.setdefault((row.provider, row.model), []).append(row)
        self._exact = {k: ModelPrices(v) for k, v in grouped.items() if not is_glob(k[1])}
        self._globs = [(k[0], glob_regex(k[1]), k[1], ModelPrices(v)) for k, v in grouped.items() if is_glob(k[1])]
        self.rows = rows

    def find(self, provider: str, model: str) -> tuple[str, ModelPrices] | None:
        """The override naming this model: (the model or glob as written, its prices)."""
        found = self._exact.get((provider, model))
        if found is not None:
            return model, found
        for glob_provider, pattern, text, prices in self._globs:
            if glob_provider == provider and pattern.match(model):
                return text, prices
        return None

    def models(self) -> list[str]:
        """Every overridden `provider/model` (globs as written)."""
        return sorted({f"{r.provider}/{r.model}" for r in self.rows})


def is_glob(model: str) -> bool:
    return "*" in model or "?" in model


def load_overrides(path: Path) -> tuple[Overrides, list[Problem]]:
    """Parse `pricing.csv`; rows with problems are left out and reported."""
    if not path.exists():
        return Overrides([]), []
    try:
        lines = csv_lines(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        return Overrides([]), [Problem(path.name, 0, f"cannot be read as UTF-8 CSV: {exc}")]
    if not lines:
        return Overrides([]), []
    header_line, header = lines[0]
    problem = _header_problem(header)
    if problem:
        return Overrides([]), [Problem(path.name, header_line, problem)]
    rows, problems, seen = [], [], set()
    for line, fields in lines[1:]:
        row = _parse_row(line, dict(zip(header, fields, strict=False)), len(fields), len(header))
        if isinstance(row, str):
            problems.append(Problem(path.name, line, row))
            continue
        key = (row.provider, row.model, row.tier, row.above, row.price.effective_from)
        if key in seen:
            problems.append(Problem(path.name, line, f"{row.provider}/{row.model} has two prices from "
                                    f"{row.price.effective_from}" + (f" for tier {row.tier}" if row.tier else "")
                                    + (f" above {row.above} prompt tokens" if row.above else "")))
            continue
        seen.add(key)
        rows.append(row)
    problems += _orphan_tiers(path.name, rows)
    return Overrides([r for r in rows if (r.provider, r.model, r.tier, 0, r.price.effective_from) in seen]), problems


def _header_problem(header: list[str]) -> str | None:
    if header[:len(HEADER)] != HEADER:
        return "header must start with " + ",".join(HEADER)
    extra = header[len(HEADER):]
    unknown = [c for c in extra if c not in OPTIONAL]
    if unknown:
        return f"unknown column(s) {', '.join(unknown)}; optional columns are {', '.join(OPTIONAL)}"
    if len(set(extra)) != len(extra):
        return "a column is named twice"
    return None


def _orphan_tiers(file: str, rows: list[Row]) -> list[Problem]:
    bases = {(r.provider, r.model, r.tier, r.price.effective_from) for r in rows if r.above == 0}
    return [Problem(file, r.line, f"a long-context row (prompt_tokens_above {r.above}) needs a row for the same "
                    "provider, model, effective_from and service_tier without prompt_tokens_above")
            for r in rows if r.above and (r.provider, r.model, r.tier, r.price.effective_from) not in bases]


def _parse_row(line: int, values: dict[str, str], count: int, expected: int) -> Row | str:
    if count != expected:
        return f"expected {expected} columns, got {count}"
    provider, model = values["provider"], values["model"]
    if not provider or not model:
        return "provider and model must not be empty"
    try:
        effective = date.fromisoformat(values["effective_from"])
    except ValueError:
        return f"effective_from {values['effective_from']!r} is not a date like 2025-01-31"
    amounts: dict[str, Decimal | None] = {}
    for column in ("input_usd_per_mtok", "output_usd_per_mtok", *RATE_COLUMNS):
        amount = _amount(column, values.get(column, ""), required=column in HEADER[3:5])
        if isinstance(amount, str):
            return amount
        amounts[column] = amount
    counts: dict[str, int | None] = {}
    for column in _NUMBER_COLUMNS:
        count = _count(column, values.get(column, ""))
        if isinstance(count, str):
            return count
        counts[column] = count
    price = Price(effective, amounts["input_usd_per_mtok"], amounts["output_usd_per_mtok"],
                  **{field: amounts[column] for column, field in RATE_COLUMNS.items()},
                  max_output_tokens=counts["max_output_tokens"])
    return Row(line, provider, model, values.get("service_tier", ""), counts["prompt_tokens_above"] or 0, price)


def _amount(column: str, text: str, required: bool) -> Decimal | None | str:
    if not text:
        return f"{column} must be a number (it may not be blank)" if required else None
    return RATE.check(column, text)


def _count(column: str, text: str) -> int | None | str:
    """A token count written as plain digits (not 1e5 nor 2.0), within `TOKEN_COUNT`; None if blank."""
    if not text:
        return None
    if not text.isdigit():
        return TOKEN_COUNT.refusal(column, repr(text), "is not a whole number of tokens")
    count = TOKEN_COUNT.check(column, text)  # also refuses digits that are no number, such as "²"
    return count if isinstance(count, str) else int(count)
