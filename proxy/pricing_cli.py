"""`tollway pricing …`: show the price a model is billed at, and check that every model in use has one.

`show` resolves a model exactly as the gateway does (an Azure deployment to the model it serves, then
`pricing.csv` overrides, then the `genai-prices` book). `check` lists the models that have no price
today among those seen in the last days of events and those the policy names exactly; when a running
gateway holds `events.duckdb` it reads the tenant-costs report instead, freshly built by the gateway.
Money is printed as exact decimals (USD per million tokens), and as strings in JSON.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from policy.files import glob_regex, load_policy_files
from proxy.metering import HEADER, OVERRIDE, Price, Prices, load_prices
from proxy.overrides import Row, is_glob
from proxy.pricebook import SOURCE, book_provider
from proxy.settings import Settings, load_settings, resolve_data_dir

TIERS = ("flex", "priority", "batch")
#: Price fields -> how they are named on screen, and the unit of their amounts.
RATES = (("input", "input", "per Mtok"), ("output", "output", "per Mtok"),
         ("cached_input", "cached input", "per Mtok"), ("cache_write", "cache write 5m", "per Mtok"),
         ("cache_write_1h", "cache write 1h", "per Mtok"), ("input_audio", "audio input", "per Mtok"),
         ("output_audio", "audio output", "per Mtok"), ("web_search_per_k", "web search", "per 1,000 calls"),
         ("request_fee", "request fee", "per request"))


@dataclass(frozen=True, slots=True)
class Target:
    """A `provider/model` as the gateway prices it."""

    provider: str
    model: str  # as asked (an Azure deployment name, say)
    priced_name: str  # the model id looked up: the deployment's model where tollway.toml names one
    book_provider: str | None


def target(settings: Settings, name: str, strict: bool = True) -> Target:
    """`openai/gpt-4o` -> its route's pricing identity; `strict`: an unknown provider is an error."""
    from proxy.cli import CommandError

    provider, _, model = name.partition("/")
    if not provider or not model:
        raise CommandError(f"{name!r}: name the model provider/model, e.g. openai/gpt-4o-mini")
    route = settings.providers.get(provider)
    if route is None and strict:
        raise CommandError(f"unknown provider {provider!r}; configured: {', '.join(sorted(settings.providers))} "
                           "(declare others in tollway.toml [providers.NAME])")
    deployed = route.deployments.get(model, model) if route is not None else model
    return Target(provider, model, deployed, _book_provider(settings, provider))


def _book_provider(settings: Settings, provider: str) -> str | None:
    """The book's id for a route (a provider no longer configured: its own name, where the book has it)."""
    route = settings.providers.get(provider)
    return book_provider(provider, route.style, route.price_provider) if route else book_provider(provider, "")


# --- show ---------------------------------------------------------------------------------------
def cmd_show(args: argparse.Namespace) -> int:
    from proxy.cli import CommandError, emit, say

    data_dir = resolve_data_dir(args.data_dir)
    settings = load_settings(data_dir)
    wanted = target(settings, args.model)
    when = _when(args.at)
    prices, problems = load_prices(data_dir / "pricing.csv")
    if problems:
        say(f"warning: pricing.csv has {len(problems)} problem(s) and those rows are left out; "
            "`tollway pricing check` lists them")
    resolution = prices.resolve(wanted.provider, wanted.priced_name, wanted.book_provider)
    priced = resolution.at(when) if resolution is not None else None
    written, lines = _override(prices, wanted)
    document = {"model": args.model, "deployment_model": _deployment_of(wanted),
                "book_provider": wanted.book_provider, "at": when.date().isoformat(), "priced_as": None, "source": None,
                "override": f"{wanted.provider}/{written}" if lines else None, "override_lines": lines,
                "price": None, "variants": {}, "shadowed_book_price": None}
    if priced is None:
        if args.json:
            emit(args, document, "")
        raise CommandError(_how_to_price(data_dir, wanted, when, lines))
    variants = {tier: v.price for tier in TIERS
                if (v := resolution.at(when, tier)) is not None and v.price != priced.price}
    shadowed = _book_price(prices, wanted, when) if priced.source == OVERRIDE else None
    document.update(priced_as=priced.model, source=priced.source, price=price_json(priced.price),
                    variants={t: price_json(p) for t, p in variants.items()},
                    shadowed_book_price=shadowed and {"model": shadowed[0], "source": SOURCE,
                                                      "price": price_json(shadowed[1])})
    text = _show_text(args.model, wanted, when, priced, lines, variants, shadowed, written)
    emit(args, document, "\n".join(text))
    return 0


def _when(text: str | None) -> datetime:
    from proxy.cli import CommandError

    if text is None:
        return datetime.now(UTC)
    try:
        day = date.fromisoformat(text)
    except ValueError as exc:
        raise CommandError(f"--at {text!r}: use a date like 2025-10-01") from exc
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _deployment_of(wanted: Target) -> str | None:
    return wanted.priced_name if wanted.priced_name != wanted.model else None


def _override(prices: Prices, wanted: Target) -> tuple[str, list[int]]:
    """The override that names this model, as the gateway finds it: (the model or glob as pricing.csv
    writes it, its lines); lines empty if none."""
    found = prices.find_override(wanted.provider, wanted.priced_name, wanted.book_provider)
    if found is None:
        return wanted.priced_name, []
    written = found[1]
    return written, [r.line for r in prices.overrides.rows if r.provider == wanted.provider and r.model == written]


def _book_price(prices: Prices, wanted: Target, when: datetime) -> tuple[str, Price] | None:
    """(the book's model id, its price at `when`) where the book prices this model."""
    info = prices.book.find(wanted.book_provider, wanted.priced_name) if wanted.book_provider else None
    price = prices.book.price_at(info, when, None) if info is not None else None
    return (info.id, price) if price is not None else None


def _show_text(asked: str, wanted: Target, when: datetime, priced, lines: list[int], variants: dict[str, Price],
               shadowed: tuple[str, Price] | None, written: str) -> list[str]:
    text = [asked]
    if wanted.priced_name != wanted.model:
        text.append(f"  deployment     {wanted.model} serves {wanted.priced_name} (tollway.toml)")
    text.append(f"  priced as      {priced.model}")
    if priced.source == OVERRIDE:
        glob = f" ({wanted.provider}/{written})" if written != wanted.priced_name else ""
        text.append(f"  source         override: pricing.csv line(s) {_join(lines)}{glob}, "
                    f"the row effective from {priced.price.effective_from}")
    else:
        text.append(f"  source         the price book, {priced.source}")
        if lines:
            text.append(f"  note           pricing.csv line(s) {_join(lines)} name it, but none is in force "
                        f"at {when.date()}")
    text.append(f"  in force at    {when.date()} (USD)")
    text += [f"    {label:16} {_usd(value)} {unit}" for label, value, unit in _rates(priced.price)]
    if priced.price.max_output_tokens:
        text.append(f"    {'max output':16} {priced.price.max_output_tokens} tokens")
    text += [f"    above {above} prompt tokens: {_rates_line(tier)}" for above, tier in priced.price.long_context]
    text += [f"  {tier:14} {_price_line(price)}" for tier, price in variants.items()]
    if shadowed:
        text.append(f"  shadows        {SOURCE} as {shadowed[0]}: {_price_line(shadowed[1])}")
    return text


def _how_to_price(data_dir: Path, wanted: Target, when: datetime, lines: list[int]) -> str:
    name = f"{wanted.provider}/{wanted.priced_name}"
    if lines:
        why = f"pricing.csv line(s) {_join(lines)} name it, but none is in force at {when.date()}"
    else:
        why = "no row of pricing.csv names it"
    if wanted.book_provider is None:
        why += (f", and the price book has no provider {wanted.provider!r} (if it knows the provider under "
                f"another id, set price_provider in tollway.toml [providers.{wanted.provider}])")
    else:
        why += f", and the price book ({SOURCE}) does not price it for provider {wanted.book_provider}"
    return (f"{name} has no price at {when.date()}: {why}.\n"
            f"Price it with a row in {data_dir / 'pricing.csv'}, in USD per million tokens (blank cached-input and "
            "cache-write prices bill at the input price). The file's header, and an example row to fill in with "
            "your provider's prices:\n"
            f"  {','.join(HEADER)}\n"
            f"  {wanted.provider},{wanted.priced_name},{when.date()},0.50,1.50,,")


# --- check --------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    from proxy.cli import CommandError, emit, say

    if args.days < 1:
        raise CommandError("--days must be 1 or more")
    data_dir = resolve_data_dir(args.data_dir)
    settings = load_settings(data_dir)
    prices, problems = load_prices(data_dir / "pricing.csv")
    now = datetime.now(UTC)
    seen = {model: {"model": model, "requests": n, "seen_in": ["events"]}
            for model, n in used_models(settings, now - timedelta(days=args.days), args.days).items()}
    files = load_policy_files(data_dir)
    for where, rules in (("policy/access.csv", files.access), ("policy/routes.csv", files.routes)):
        for rule in rules:
            if "/" in rule.model_glob and not is_glob(rule.model_glob):
                entry = seen.setdefault(rule.model_glob, {"model": rule.model_glob, "requests": 0, "seen_in": []})
                entry["seen_in"].append(f"{where}:{rule.line}")
    unpriced = [entry for model, entry in sorted(seen.items()) if not _has_price(settings, prices, model, now)]
    shadowing = shadowing_overrides(settings, prices, now)
    emit(args, {"days": args.days, "unpriced": unpriced, "shadowing_overrides": [s for s, _ in shadowing],
                "problems": [str(p) for p in problems]},
         "\n".join(_check_text(args.days, unpriced, [t for _, t in shadowing], problems)))
    if unpriced:
        say(f"{len(unpriced)} model(s) have no price: price each with a row in pricing.csv "
            "(`tollway pricing show PROVIDER/MODEL` shows how)")
    if problems:
        say(f"pricing.csv has {len(problems)} problem(s); the rows with problems are left out until fixed")
    return 1 if unpriced or problems else 0


def used_models(settings: Settings, since: datetime, days: int) -> dict[str, int]:
    """Requests per `provider/model` since `since`: from events.duckdb, or from the tenant-costs
    report (built now by the running gateway) when the gateway holds the database."""
    import duckdb

    from proxy.cli import say
    from proxy.recorder import DUCKDB_CONFIG

    if not settings.events_db.exists():
        say("no events.duckdb yet: checking the models the policy names")
        return {}
    try:
        con = duckdb.connect(str(settings.events_db), read_only=True, config=DUCKDB_CONFIG)
    except duckdb.IOException:
        return _models_from_report(settings, since, days)
    try:
        # Requests with no tenant were never authenticated: their model names are anyone's text.
        rows = con.execute("SELECT model, count(*) FROM events WHERE ts >= ? AND model IS NOT NULL "
                           "AND tenant IS NOT NULL GROUP BY model", [since]).fetchall()
    except duckdb.CatalogException:
        rows = []
    finally:
        con.close()
    say(f"read the last {days} day(s) of events from {settings.events_db}")
    return dict(rows)


def _models_from_report(settings: Settings, since: datetime, days: int) -> dict[str, int]:
    import polars as pl

    from analytics.jobs import run_now
    from proxy.cli import CommandError, say

    say("events.duckdb is held by the running gateway: asking it to build the reports now")
    try:
        manifest, _ = run_now(settings.data_dir, settings.events_db, settings.reports_dir)
    except TimeoutError as exc:
        raise CommandError(str(exc)) from exc
    path = settings.reports_dir / "tenant_costs.parquet"
    say(f"read the last {days} day(s) of {path} (built {manifest['built_at']}) instead of events.duckdb")
    if not path.exists():
        return {}
    frame = (pl.read_parquet(path).filter(pl.col("day") >= since.date())
             .group_by("model").agg(pl.col("requests").sum()))
    return {row["model"]: int(row["requests"]) for row in frame.iter_rows(named=True)}


def _has_price(settings: Settings, prices: Prices, model: str, now: datetime) -> bool:
    wanted = target(settings, model, strict=False)
    resolution = prices.resolve(wanted.provider, wanted.priced_name, wanted.book_provider)
    return resolution is not None and resolution.at(now) is not None


def shadowing_overrides(settings: Settings, prices: Prices, now: datetime) -> list[tuple[dict, str]]:
    """Each pricing.csv row naming a model the book prices: (its JSON, its line of text)."""
    out = []
    for row in prices.overrides.rows:
        book = _book_prices(prices, _book_provider(settings, row.provider), row, now)
        if book:
            out.append(_shadowing(row, book))
    return out


def _book_prices(prices: Prices, provider: str | None, row: Row, now: datetime) -> list[tuple[str, Price]]:
    """(book model id, its price at the row's service tier) for each model a pricing.csv row names."""
    if provider is None:
        return []
    if is_glob(row.model):
        pattern = glob_regex(row.model)
        infos = [prices.book.find(provider, m) for m in prices.book.model_ids(provider) if pattern.match(m)]
    else:
        infos = [prices.book.find(provider, row.model)]
    found = [(info.id, prices.book.price_at(info, now, row.tier or None)) for info in infos if info is not None]
    return [(model, price) for model, price in found if price is not None]


def _shadowing(row: Row, book: list[tuple[str, Price]]) -> tuple[dict, str]:
    name = f"{row.provider}/{row.model}"
    where = (f"pricing.csv:{row.line} {name}" + (f" (service_tier {row.tier})" if row.tier else "")
             + (f" (prompts above {row.above})" if row.above else ""))
    document = {"line": row.line, "model": name, "service_tier": row.tier or None,
                "prompt_tokens_above": row.above or None, "book_source": SOURCE,
                "book": [{"model": m, "price": price_json(p)} for m, p in book]}
    if len(book) > 1:
        return document, f"{where} overrides {SOURCE} for {len(book)} book models: {', '.join(m for m, _ in book)}"
    model, price = book[0]
    named = "" if model == row.model else f" as {model}"
    return document, (f"{where} overrides {SOURCE} "
                      f"(book{named}: {_usd(price.input)} in / {_usd(price.output)} out per Mtok)")


def _check_text(days: int, unpriced: list[dict], shadowing: list[str], problems) -> list[str]:
    text = [str(p) for p in problems]
    if unpriced:
        width = max(len("UNPRICED MODEL"), *(len(u["model"]) for u in unpriced))
        text.append(f"{'UNPRICED MODEL':{width}} {'REQUESTS':>8}  SEEN IN")
        text += [f"{u['model']:{width}} {u['requests']:>8}  {', '.join(u['seen_in'])}" for u in unpriced]
    else:
        text.append(f"every model used in the last {days} day(s) or named in the policy has a price")
    if shadowing:
        text.append("overrides of models the price book prices "
                    "(informational: drop a row to bill at the book's price):")
        text += [f"  {line}" for line in shadowing]
    return text


# --- formatting ---------------------------------------------------------------------------------
def price_json(price: Price) -> dict:
    """Every field, decimals as strings; `effective_from` is null for the book's prices (undated)."""
    document = {field: _text(getattr(price, field)) for field, _, _ in RATES}
    document["effective_from"] = price.effective_from.isoformat() if price.effective_from != date.min else None
    document["max_output_tokens"] = price.max_output_tokens
    document["long_context"] = [{"prompt_tokens_above": above, **price_json(tier)}
                                for above, tier in price.long_context]
    return document


def _rates(price: Price) -> list[tuple[str, Decimal, str]]:
    return [(label, getattr(price, field), unit) for field, label, unit in RATES
            if getattr(price, field) is not None]


def _rates_line(price: Price) -> str:
    return ", ".join(f"{label} {_usd(value)}" + (f" {unit}" if unit != "per Mtok" else "")
                     for label, value, unit in _rates(price))


def _price_line(price: Price) -> str:
    return "; ".join([_rates_line(price)] + [f"above {above} prompt tokens: {_rates_line(tier)}"
                                             for above, tier in price.long_context])


def _usd(value: Decimal) -> str:
    return "$" + _text(value)


def _text(value: Decimal | None) -> str | None:
    """An exact decimal without trailing zeros or exponent: 22.50 -> "22.5", 10 -> "10"."""
    return None if value is None else format(value.normalize(), "f")


def _join(lines: list[int]) -> str:
    return ", ".join(map(str, lines))


def register(commands, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    pricing = commands.add_parser("pricing", parents=[common],
                                  help="prices: show (a model's price and its source), check (models with none)")
    actions = pricing.add_subparsers(dest="pricing_command", required=True, metavar="ACTION")
    show = actions.add_parser("show", parents=[common, as_json],
                              help="the price a model is billed at, where it comes from, its tiers and variants")
    show.add_argument("model", metavar="PROVIDER/MODEL", help="e.g. anthropic/claude-sonnet-4-5-20250929")
    show.add_argument("--at", metavar="YYYY-MM-DD", help="the price in force on this UTC date (default: now)")
    show.set_defaults(func=cmd_show)
    check = actions.add_parser("check", parents=[common, as_json],
                               help="exit 1 when a model in recent events or named in the policy has no price")
    check.add_argument("--days", type=int, default=30, help="how many days of events to look at (default 30)")
    check.set_defaults(func=cmd_check)
