"""Prices from pricing.csv and the exact cost of a request."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.files import Problem
from proxy.metering import HEADER, Price, cost_of
from proxy.providers.base import Usage
from tests.pricing_helpers import OverrideBook, load_pricebook

HEADER_LINE = ",".join(HEADER)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def write_prices(tmp_path: Path, *rows: str, header: str = HEADER_LINE) -> Path:
    path = tmp_path / "pricing.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


# --- overrides by date ---------------------------------------------------------------------------------
O3_ROWS = ("openai,o3,2025-04-16,10.00,40.00,2.50,", "openai,o3,2025-06-10,2.00,8.00,0.50,")


@pytest.fixture
def o3(tmp_path) -> OverrideBook:
    book, problems = load_pricebook(write_prices(tmp_path, *O3_ROWS))
    assert problems == []
    return book


def test_o3_has_two_versions(o3):
    april = o3.price_at("openai", "o3", at("2025-04-16T00:00:00+00:00"))
    june = o3.price_at("openai", "o3", at("2025-06-10T00:00:00+00:00"))
    assert (april.effective_from, april.input, april.output) == (date(2025, 4, 16), Decimal("10.00"), Decimal("40.00"))
    assert (june.effective_from, june.input, june.output) == (date(2025, 6, 10), Decimal("2.00"), Decimal("8.00"))


@pytest.mark.parametrize("when, effective", [
    ("2025-04-16T00:00:00+00:00", date(2025, 4, 16)),
    ("2025-06-09T00:00:00+00:00", date(2025, 4, 16)),
    ("2025-06-09T23:59:59.999999+00:00", date(2025, 4, 16)),
    ("2025-06-10T00:00:00+00:00", date(2025, 6, 10)),
    ("2025-06-10T12:00:00+00:00", date(2025, 6, 10)),
    ("2027-01-01T00:00:00+00:00", date(2025, 6, 10)),
    # the date is the UTC date of the request's start
    ("2025-06-10T01:00:00+02:00", date(2025, 4, 16)),  # 2025-06-09 23:00 UTC
    ("2025-06-09T20:00:00-05:00", date(2025, 6, 10)),  # 2025-06-10 01:00 UTC
])
def test_o3_price_in_force(o3, when, effective):
    assert o3.price_at("openai", "o3", at(when)).effective_from == effective


def test_o3_cost_changes_on_the_effective_date(o3):
    usage = Usage(input_tokens=1000, output_tokens=1000)
    before = o3.cost("openai", "o3", at("2025-06-09T12:00:00+00:00"), usage)
    after = o3.cost("openai", "o3", at("2025-06-10T12:00:00+00:00"), usage)
    assert before == Decimal("0.050000000")  # 1000 * 10 / 1e6 + 1000 * 40 / 1e6
    assert after == Decimal("0.010000000")  # 1000 * 2 / 1e6 + 1000 * 8 / 1e6


def test_before_the_first_effective_date_there_is_no_price(o3):
    assert o3.price_at("openai", "o3", at("2025-04-15T23:59:59+00:00")) is None
    assert o3.cost("openai", "o3", at("2025-04-15T12:00:00+00:00"), Usage(input_tokens=10, output_tokens=1)) is None


@pytest.mark.parametrize("provider, model", [
    ("openai", "gpt-99"), ("acme", "o3"), ("anthropic", "o3"), ("openai", "O3"), ("openai", "o3-2025-04-16"),
])
def test_a_model_the_overrides_do_not_name_costs_none_not_zero(o3, provider, model):
    cost = o3.cost(provider, model, at("2026-01-01T00:00:00+00:00"), Usage(input_tokens=100, output_tokens=10))
    assert cost is None
    assert o3.price_at(provider, model, at("2026-01-01T00:00:00+00:00")) is None


def test_unknown_usage_costs_none(o3):
    assert o3.cost("openai", "o3", at("2026-01-01T00:00:00+00:00"), Usage()) is None


def test_zero_usage_costs_zero(o3):
    cost = o3.cost("openai", "o3", at("2026-01-01T00:00:00+00:00"), Usage(input_tokens=0, output_tokens=0))
    assert cost == Decimal("0") and cost is not None


def test_unsorted_rows_are_ordered_by_date(tmp_path):
    path = write_prices(tmp_path, "openai,m,2025-03-01,3,3,,", "openai,m,2025-01-01,1,1,,", "openai,m,2025-02-01,2,2,,")
    book, problems = load_pricebook(path)
    assert problems == []
    for day, price in [("2025-01-15", "1"), ("2025-02-15", "2"), ("2025-03-15", "3")]:
        assert book.price_at("openai", "m", at(day + "T00:00:00+00:00")).input == Decimal(price)


# --- cost_of, by hand --------------------------------------------------------------------------------
SONNET = Price(date(2025, 9, 29), Decimal("3.00"), Decimal("15.00"), Decimal("0.30"), Decimal("3.75"))
FLASH = Price(date(2025, 6, 17), Decimal("0.30"), Decimal("2.50"), Decimal("0.03"), None)
NO_CACHE_PRICES = Price(date(2024, 1, 1), Decimal("2"), Decimal("8"), None, None)


@pytest.mark.parametrize("price, usage, expected", [
    # Anthropic fixture: 27 fresh + 6120 read + 1843 written; 31 out.
    # 27*3 + 6120*0.30 + 1843*3.75 + 31*15 = 81 + 1836 + 6911.25 + 465 = 9293.25 -> / 1e6
    (SONNET, Usage(input_tokens=7990, output_tokens=31, cached_input_tokens=6120, cache_write_tokens=1843),
     "0.009293250"),
    # Gemini fixture: 425 fresh + 4096 cached; 440 out (reasoning included).
    # 425*0.30 + 4096*0.03 + 440*2.50 = 127.5 + 122.88 + 1100 = 1350.38
    (FLASH, Usage(input_tokens=4521, output_tokens=440, cached_input_tokens=4096, reasoning_tokens=417),
     "0.001350380"),
    # blank cache-write price: written tokens at the input price. 600*0.30 + 400*0.30 = 300
    (FLASH, Usage(input_tokens=1000, output_tokens=0, cache_write_tokens=400), "0.000300000"),
    # blank cached and cache-write prices: everything at the input price. 1000*2 + 10*8 = 2080
    (NO_CACHE_PRICES, Usage(input_tokens=1000, output_tokens=10, cached_input_tokens=500, cache_write_tokens=200),
     "0.002080000"),
    # the docstring's example: 600*2.5 + 400*1.25 + 100*10 = 3000
    (Price(date(2025, 1, 1), Decimal("2.50"), Decimal("10"), Decimal("1.25"), None),
     Usage(input_tokens=1000, output_tokens=100, cached_input_tokens=400), "0.003000000"),
    # only output known
    (SONNET, Usage(output_tokens=1_000_000), "15.000000000"),
    # a million of each
    (SONNET, Usage(input_tokens=3_000_000, output_tokens=1_000_000, cached_input_tokens=1_000_000,
                   cache_write_tokens=1_000_000), "22.050000000"),
    # reasoning tokens are part of output, not extra
    (SONNET, Usage(input_tokens=0, output_tokens=100, reasoning_tokens=90), "0.001500000"),
])
def test_cost_of_by_hand(price, usage, expected):
    cost = cost_of(price, usage)
    assert isinstance(cost, Decimal)
    assert cost == Decimal(expected)
    assert f"{cost:f}" == expected  # nine places, exactly
    assert cost.as_tuple().exponent == -9


def test_cost_of_one_token_keeps_nano_dollars():
    price = Price(date(2025, 1, 1), Decimal("0.15"), Decimal("0.60"), None, None)
    assert f"{cost_of(price, Usage(input_tokens=1, output_tokens=1)):f}" == "0.000000750"


@pytest.mark.parametrize("input_price, tokens, expected", [
    ("0.0005", 1, "0.000000001"),  # 0.5 nano-dollar rounds up (half-even would give 0)
    ("0.0025", 1, "0.000000003"),  # 2.5 -> 3 (half-even would give 2)
    ("0.0015", 1, "0.000000002"),
    ("0.0004", 1, "0.000000000"),
    ("0.00049", 1, "0.000000000"),
    ("0.0006", 1, "0.000000001"),
    ("0.0000005", 1000, "0.000000001"),
])
def test_cost_rounds_half_up_to_a_nano_dollar(input_price, tokens, expected):
    price = Price(date(2025, 1, 1), Decimal(input_price), Decimal(0), None, None)
    assert f"{cost_of(price, Usage(input_tokens=tokens, output_tokens=0)):f}" == expected


def test_cached_tokens_above_input_do_not_give_a_negative_fresh_part():
    cost = cost_of(SONNET, Usage(input_tokens=100, output_tokens=0, cached_input_tokens=150))
    assert cost == Decimal(150) * Decimal("0.30") / Decimal(1_000_000)
    assert cost >= 0


# --- bad rows -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row, words", [
    ("openai,m,2025-01-01,1,2,3", "columns"),
    ("openai,m,2025-01-01,1,2,3,4,5", "columns"),
    ("openai,m,2025-13-01,1,2,,", "date"),
    ("openai,m,yesterday,1,2,,", "date"),
    ("openai,m,01/02/2025,1,2,,", "date"),
    ("openai,m,,1,2,,", "date"),
    ("openai,m,2025-01-01,-1,2,,", ">= 0"),
    ("openai,m,2025-01-01,1,-0.01,,", ">= 0"),
    ("openai,m,2025-01-01,1,2,-3,", ">= 0"),
    ("openai,m,2025-01-01,1,2,,-4", ">= 0"),
    ("openai,m,2025-01-01,one,2,,", "not a number"),
    ("openai,m,2025-01-01,1,$2,,", "not a number"),
    ("openai,m,2025-01-01,1,2,x,", "not a number"),
    ("openai,m,2025-01-01,,2,,", "number"),  # the input price may not be blank
    ("openai,m,2025-01-01,1,,,", "number"),  # nor the output price
    ("openai,m,2025-01-01,Infinity,2,,", ">= 0"),
    ("openai,m,2025-01-01,NaN,2,,", ">= 0"),
    (",m,2025-01-01,1,2,,", "empty"),
    ("openai,,2025-01-01,1,2,,", "empty"),
])
def test_bad_row_is_a_problem_with_its_line(tmp_path, row, words):
    path = write_prices(tmp_path, "# a comment", "openai,good,2025-01-01,1,2,,", "", row, "openai,after,2025-01-01,1,2,,")
    book, problems = load_pricebook(path)
    assert len(problems) == 1, problems
    problem = problems[0]
    assert isinstance(problem, Problem)
    assert (problem.file, problem.line, problem.severity) == ("pricing.csv", 5, "error")
    assert words in problem.message
    assert str(problem).startswith("pricing.csv:5: error: ")
    # the good rows around it still load; the bad one is left out
    assert "openai/good" in book.models() and "openai/after" in book.models()
    assert "openai/m" not in book.models()


def test_duplicate_date_is_a_problem_and_the_first_row_stays(tmp_path):
    path = write_prices(tmp_path, "openai,m,2025-01-01,1,2,,", "openai,other,2025-01-01,5,5,,",
                        "openai,m,2025-01-01,7,8,,", "openai,m,2025-02-01,3,4,,")
    book, problems = load_pricebook(path)
    assert [(p.file, p.line) for p in problems] == [("pricing.csv", 4)]
    assert "two prices" in problems[0].message and "2025-01-01" in problems[0].message
    assert book.price_at("openai", "m", at("2025-01-15T00:00:00+00:00")).input == Decimal(1)
    assert book.price_at("openai", "m", at("2025-02-15T00:00:00+00:00")).input == Decimal(3)


def test_several_bad_rows_are_all_reported(tmp_path):
    path = write_prices(tmp_path, "openai,a,2025-01-01,1,2", "openai,b,bad,1,2,,", "openai,c,2025-01-01,-1,2,,",
                        "openai,d,2025-01-01,1,2,,")
    book, problems = load_pricebook(path)
    assert [p.line for p in problems] == [2, 3, 4]
    assert book.models() == ["openai/d"]


def test_wrong_header_refuses_the_file(tmp_path):
    path = write_prices(tmp_path, "openai,m,2025-01-01,1,2,,", header="provider,model,date,in,out,cached,write")
    book, problems = load_pricebook(path)
    assert len(problems) == 1
    assert (problems[0].line, problems[0].severity) == (1, "error")
    assert "header" in problems[0].message
    assert book.models() == []


def test_header_after_comment_lines_keeps_its_line_number(tmp_path):
    path = tmp_path / "pricing.csv"
    path.write_text("# one\n# two\nprovider,model\nopenai,m,2025-01-01,1,2,,\n")
    _, problems = load_pricebook(path)
    assert [(p.file, p.line) for p in problems] == [("pricing.csv", 3)]


def test_a_missing_file_means_no_overrides(tmp_path):
    book, problems = load_pricebook(tmp_path / "pricing.csv")
    assert problems == []
    assert book.cost("openai", "gpt-4o-mini", datetime.now(UTC), Usage(input_tokens=1, output_tokens=1)) is None


def test_spaces_around_fields_are_tolerated(tmp_path):
    path = write_prices(tmp_path, "openai, m , 2025-01-01 , 1.5 , 2 , , ")
    book, problems = load_pricebook(path)
    assert problems == []
    assert book.price_at("openai", "m", at("2025-01-02T00:00:00+00:00")).input == Decimal("1.5")


# --- properties ------------------------------------------------------------------------------------------
counts = st.integers(min_value=0, max_value=5_000_000)
# at most three decimals per million tokens: every cost is exact at nine places, so no rounding at all
exact_prices = st.decimals(min_value=0, max_value=200, places=3, allow_nan=False, allow_infinity=False)
any_prices = st.decimals(min_value=0, max_value=200, places=7, allow_nan=False, allow_infinity=False)


@st.composite
def prices(draw, amounts=exact_prices):
    return Price(date(2025, 1, 1), draw(amounts), draw(amounts), draw(st.none() | amounts), draw(st.none() | amounts))


@st.composite
def usages(draw):
    fresh, cached, written, output = draw(counts), draw(counts), draw(counts), draw(counts)
    return Usage(input_tokens=fresh + cached + written, output_tokens=output, cached_input_tokens=cached,
                 cache_write_tokens=written)


def add(a: Usage, b: Usage) -> Usage:
    return Usage(input_tokens=a.input_tokens + b.input_tokens, output_tokens=a.output_tokens + b.output_tokens,
                 cached_input_tokens=a.cached_input_tokens + b.cached_input_tokens,
                 cache_write_tokens=a.cache_write_tokens + b.cache_write_tokens)


@settings(max_examples=150, deadline=None)
@given(prices(), usages(), usages())
def test_cost_is_additive_in_tokens(price, a, b):
    total = cost_of(price, add(a, b))
    assert total == cost_of(price, a) + cost_of(price, b)
    assert type(total) is Decimal


@settings(max_examples=150, deadline=None)
@given(prices(any_prices), usages(), usages())
def test_cost_is_monotonic_in_tokens_and_never_float(price, a, extra):
    small, big = cost_of(price, a), cost_of(price, add(a, extra))
    assert type(small) is Decimal and type(big) is Decimal
    assert not isinstance(small, float)
    assert Decimal(0) <= small <= big
    assert small.as_tuple().exponent == -9 and big.as_tuple().exponent == -9


@settings(max_examples=100, deadline=None)
@given(prices(any_prices), usages())
def test_cost_matches_the_formula_within_half_a_nano_dollar(price, usage):
    cached_price = price.cached_input if price.cached_input is not None else price.input
    write_price = price.cache_write if price.cache_write is not None else price.input
    fresh = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
    exact = (fresh * price.input + usage.cached_input_tokens * cached_price
             + usage.cache_write_tokens * write_price + usage.output_tokens * price.output) / Decimal(1_000_000)
    assert abs(cost_of(price, usage) - exact) <= Decimal("0.0000000005")


@settings(max_examples=100, deadline=None)
@given(prices(), usages(), st.integers(0, 3000))
def test_pricebook_cost_uses_the_row_in_force(price, usage, days):
    book = OverrideBook.of({("p", "m"): [price]})
    when = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(days=days)
    assert book.cost("p", "m", when, usage) == cost_of(price, usage)
    assert book.cost("p", "m", datetime(2024, 12, 31, 23, 59, tzinfo=UTC), usage) is None
    assert book.cost("p", "m", datetime(2025, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))), usage) is None


# --- every billable dimension, by hand ---------------------------------------------------------------------
TIERED = Price(date(2025, 1, 1), Decimal(3), Decimal(15), Decimal("0.30"), Decimal("3.75"), Decimal(6),
               long_context=((200_000, Price(date(2025, 1, 1), Decimal(6), Decimal("22.5"), Decimal("0.60"),
                                             Decimal("7.50"), Decimal(12))),))
FULL = Price(date(2025, 1, 1), Decimal(1), Decimal(4), Decimal("0.10"), Decimal("1.25"), Decimal(2),
             input_audio=Decimal(8), output_audio=Decimal(16), web_search_per_k=Decimal(10), request_fee=Decimal("0.001"))


@pytest.mark.parametrize("price, usage, expected", [
    # 1-hour writes at their own rate: 500 fresh*3 + 1000 read*0.3 + 1000 5m*3.75 + 2000 1h*6 + 100 out*15
    # = 1500 + 300 + 3750 + 12000 + 1500 = 19050
    (TIERED, Usage(input_tokens=4500, output_tokens=100, cached_input_tokens=1000, cache_write_tokens=3000,
                   cache_write_1h_tokens=2000), "0.019050000"),
    # exactly 200,000 prompt tokens: the base rates. 200000*3 + 1000*15 = 615000
    (TIERED, Usage(input_tokens=200_000, output_tokens=1000), "0.615000000"),
    # one token more: every token at the long-context rates. 200001*6 + 1000*22.5 = 1222506
    (TIERED, Usage(input_tokens=200_001, output_tokens=1000), "1.222506000"),
    # the tier counts cached tokens too: 150000 fresh*6 + 60000 read*0.6 + 10*22.5 = 900000+36000+225
    (TIERED, Usage(input_tokens=210_000, output_tokens=10, cached_input_tokens=60_000), "0.936225000"),
    # audio in and out, searches and a per-request fee:
    # (700-100 read-200 audio)=400*1 + 200*8 + 100*0.1 + (50-20)*4 + 20*16 = 400+1600+10+120+320 = 2450
    # + 3 searches * 10/1000 = 0.03 + fee 0.001
    (FULL, Usage(input_tokens=700, output_tokens=50, cached_input_tokens=100, input_audio_tokens=200,
                 output_audio_tokens=20, web_search_calls=3), "0.033450000"),
    # no rate for audio or 1-hour writes: the general rates. 1000 in*3 + 10 out*15 (audio) ; 400 1h writes at 3.75
    (Price(date(2025, 1, 1), Decimal(3), Decimal(15), None, Decimal("3.75")),
     Usage(input_tokens=1400, output_tokens=10, cache_write_tokens=400, cache_write_1h_tokens=400,
           input_audio_tokens=1000, output_audio_tokens=10), "0.004650000"),
    # a per-request fee alone is billed even with no tokens
    (FULL, Usage(input_tokens=0, output_tokens=0), "0.001000000"),
])
def test_every_dimension_by_hand(price, usage, expected):
    assert f"{cost_of(price, usage):f}" == expected


# --- override columns ------------------------------------------------------------------------------------------
FULL_HEADER = (HEADER_LINE + ",cache_write_1h_usd_per_mtok,input_audio_usd_per_mtok,output_audio_usd_per_mtok,"
               "web_search_usd_per_kcall,request_usd,service_tier,prompt_tokens_above,max_output_tokens")


def test_optional_columns_say_everything_the_book_can(tmp_path):
    path = write_prices(tmp_path, "anthropic,claude-x,2025-01-01,3,15,0.3,3.75,6,,,10,,,,64000",
                        "anthropic,claude-x,2025-01-01,6,22.5,0.6,7.5,12,,,10,,,200000,",
                        "openai,gpt-y,2025-01-01,2,8,0.5,,,40,80,,0.002,,,",
                        "openai,gpt-y,2025-01-01,1,4,0.25,,,,,,,flex,,", header=FULL_HEADER)
    book, problems = load_pricebook(path)
    assert problems == []
    when = at("2025-06-01T00:00:00+00:00")
    claude = book.price_at("anthropic", "claude-x", when)
    assert (claude.input, claude.cache_write_1h, claude.web_search_per_k, claude.max_output_tokens) == (
        Decimal(3), Decimal(6), Decimal(10), 64000)
    assert [(t, p.input, p.output, p.cache_write_1h) for t, p in claude.long_context] == [
        (200_000, Decimal(6), Decimal("22.5"), Decimal(12))]
    gpt = book.price_at("openai", "gpt-y", when)
    assert (gpt.input, gpt.input_audio, gpt.output_audio, gpt.request_fee) == (Decimal(2), Decimal(40), Decimal(80),
                                                                              Decimal("0.002"))
    assert book.price_at("openai", "gpt-y", when, "flex").input == Decimal(1)
    assert book.price_at("openai", "gpt-y", when, "priority").input == Decimal(2)  # no row of its own: the base row


def test_optional_columns_may_come_in_any_order_and_old_files_keep_working(tmp_path):
    header = HEADER_LINE + ",service_tier,cache_write_1h_usd_per_mtok"
    book, problems = load_pricebook(write_prices(tmp_path, "anthropic,m,2025-01-01,3,15,,,batch,1.5",
                                                 header=header))
    assert problems == [] and book.price_at("anthropic", "m", at("2025-02-01T00:00:00+00:00")) is None
    assert book.price_at("anthropic", "m", at("2025-02-01T00:00:00+00:00"), "batch").cache_write_1h == Decimal("1.5")


@pytest.mark.parametrize("header, rows, words", [
    (HEADER_LINE + ",colour", ["openai,m,2025-01-01,1,2,,,red"], "unknown column(s) colour"),
    (HEADER_LINE + ",service_tier,service_tier", ["openai,m,2025-01-01,1,2,,,a,b"], "named twice"),
    (FULL_HEADER, ["openai,m,2025-01-01,1,2,,,,,,,,,,lots"], "whole number"),
    (FULL_HEADER, ["openai,m,2025-01-01,1,2,,,,,,,,,1e5,"], "whole number"),
    (FULL_HEADER, ["openai,m,2025-01-01,1,2,,,,,,-1,,,,"], ">= 0"),
    (FULL_HEADER, ["openai,m,2025-01-01,6,22,,,,,,,,,200000,"], "needs a row for the same"),
    (FULL_HEADER, ["openai,m,2025-01-01,1,2,,,,,,,,flex,,", "openai,m,2025-01-01,3,4,,,,,,,,flex,,"], "for tier flex"),
])
def test_bad_optional_columns_are_problems(tmp_path, header, rows, words):
    _, problems = load_pricebook(write_prices(tmp_path, *rows, header=header))
    assert problems and words in problems[-1].message, problems


def test_exact_names_win_over_globs_and_the_first_glob_wins(tmp_path):
    path = write_prices(tmp_path, "vllm,llama-*,2025-01-01,1,1,,", "vllm,llama-3*,2025-01-01,2,2,,",
                        "vllm,llama-3.3-70b,2025-01-01,3,3,,")
    book, problems = load_pricebook(path)
    assert problems == []
    when = at("2025-06-01T00:00:00+00:00")
    assert book.price_at("vllm", "llama-3.3-70b", when).input == Decimal(3)
    assert book.price_at("vllm", "llama-3.1-8b", when).input == Decimal(1)
    assert book.price_at("openai", "llama-3.1-8b", when) is None


# --- resolution: overrides, then the book by the request's model, then by the response's ------------------------
NOW = at("2026-12-01T12:00:00+00:00")


def prices_with(tmp_path, *rows: str):
    from proxy.metering import load_prices
    found, problems = load_prices(write_prices(tmp_path, *rows))
    assert problems == []
    return found


@pytest.mark.parametrize("provider, book, model, resolved, rates", [
    # list prices per million tokens (input, output, cached input), as published by each provider
    ("anthropic", "anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5", ("3", "15", "0.3")),
    ("openai", "openai", "gpt-4o-2024-08-06", "gpt-4o", ("2.5", "10", "1.25")),
    ("openai", "openai", "gpt-5-2025-08-07", "gpt-5", ("1.25", "10", "0.125")),
    ("openai", "openai", "chatgpt-4o-latest", "chatgpt-4o-latest", ("5", "15", None)),
    ("openai", "openai", "ft:gpt-4o-mini-2024-07-18:acme::abc123", "ft:gpt-4o-mini", ("0.3", "1.2", None)),
    ("gemini", "google", "gemini-2.5-flash", "gemini-2.5-flash", ("0.3", "2.5", "0.03")),
    ("azure", "azure", "gpt-4o", "gpt-4o", ("2.5", "10", "1.25")),
])
def test_the_book_prices_the_ids_real_clients_send(tmp_path, provider, book, model, resolved, rates):
    priced = prices_with(tmp_path).price(provider, model, book, NOW)
    assert (priced.model, priced.source) == (resolved, "genai-prices 0.2.5")
    expected = tuple(None if r is None else Decimal(r) for r in rates)
    assert (priced.price.input, priced.price.output, priced.price.cached_input) == expected


@pytest.mark.parametrize("model", ["ft:gpt-4.1-nano-2025-04-14:acme::x1", "gpt-99", "my-house-alias"])
def test_an_unknown_model_or_a_fine_tune_without_its_own_rate_is_unpriced(tmp_path, model):
    prices = prices_with(tmp_path)
    assert prices.price("openai", model, "openai", NOW) is None
    assert prices.cost("openai", model, "openai", NOW, Usage(input_tokens=10, output_tokens=10)) == (None, None)


def test_the_response_model_prices_what_the_request_model_cannot(tmp_path):
    usage = Usage(input_tokens=1000, output_tokens=100, response_model="gpt-4o-2024-11-20")
    cost, priced = prices_with(tmp_path).cost("openai", "my-house-alias", "openai", NOW, usage)
    assert (priced.model, cost) == ("gpt-4o", Decimal("0.003500000"))  # 1000*2.5 + 100*10


def test_an_override_wins_and_covers_the_snapshots_of_the_id_it_names(tmp_path):
    prices = prices_with(tmp_path, "anthropic,claude-sonnet-4-5,2026-01-01,2.70,13.50,0.27,3.375")
    for model in ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929"):
        priced = prices.price("anthropic", model, "anthropic", NOW)
        assert (priced.model, priced.source, priced.price.input) == ("claude-sonnet-4-5", "override", Decimal("2.70"))
    # before the override's first date the book's price applies
    before = prices.price("anthropic", "claude-sonnet-4-5-20250929", "anthropic", at("2025-12-31T23:00:00+00:00"))
    assert (before.source, before.price.input) == ("genai-prices 0.2.5", Decimal(3))


def test_an_override_prices_a_model_the_book_does_not_know(tmp_path):
    prices = prices_with(tmp_path, "vllm,llama-3.3-*,2025-01-01,0.20,0.20,,")
    priced = prices.price("vllm", "llama-3.3-70b-instruct", None, NOW)
    assert (priced.model, priced.source) == ("llama-3.3-70b-instruct", "override")  # a glob prices the id sent
    assert prices.price("vllm", "mistral-7b", None, NOW) is None


def test_service_tiers_and_batch_come_from_the_book(tmp_path):
    prices = prices_with(tmp_path)
    rates = {tier: prices.price("openai", "gpt-5", "openai", NOW, tier).price for tier in (None, "flex", "priority",
                                                                                           "batch", "default")}
    assert (rates[None].input, rates[None].output) == (Decimal("1.25"), Decimal(10))
    assert (rates["flex"].input, rates["flex"].output) == (Decimal("0.625"), Decimal(5))
    assert (rates["priority"].input, rates["priority"].output) == (Decimal("2.5"), Decimal(20))
    assert (rates["batch"].input, rates["batch"].output) == (Decimal("0.625"), Decimal(5))
    assert rates["default"] == rates[None]


def test_rates_finer_than_nine_decimals_are_still_exact():
    # 0.0000000015 USD per million tokens has ten decimals: computed in Decimal, not in integer units
    fine = Price(date(2025, 1, 1), Decimal("0.0000000015"), Decimal("1"))
    assert fine.units is None and Price(date(2025, 1, 1), Decimal("0.15"), Decimal("1")).units is not None
    # 10**12 tokens * 0.0000000015 / 1e6 = 0.0015 ; + 1 output token * 1 / 1e6 = 0.000001
    assert f"{cost_of(fine, Usage(input_tokens=10**12, output_tokens=1)):f}" == "0.001501000"
    # and a rate whose exact share is below half a nano-dollar rounds away: 1 token at it is 1.5e-15
    assert f"{cost_of(fine, Usage(input_tokens=1, output_tokens=0)):f}" == "0.000000000"


def test_a_tiny_cost_is_written_without_an_exponent():
    tiny = cost_of(Price(date(2025, 1, 1), Decimal("0.15"), Decimal("0.6")), Usage(input_tokens=1, output_tokens=0))
    assert tiny == Decimal("0.00000015") and f"{tiny:f}" == "0.000000150"


def test_random_model_names_grow_no_unbounded_cache(tmp_path):
    prices = prices_with(tmp_path)
    for i in range(2000):  # a client inventing model ids under an `openai/*` rule
        assert prices.price("openai", f"gpt-invented-{i}", "openai", NOW) is None
    book_snapshot = prices.book._snapshot  # the library's own lookup caches are never used
    assert (len(book_snapshot._lookup_cache), len(book_snapshot._provider_cache)) == (0, 0)


# --- a byte-order mark opening the file; absurd numbers ---------------------------------------------------
BOM = b"\xef\xbb\xbf"
PRICING_TEXT = ("# overrides, saved by Excel\n" + FULL_HEADER + "\n"
                "anthropic,claude-x,2025-01-01,3,15,0.3,3.75,6,,,10,,,,64000\n"
                "anthropic,claude-x,2025-01-01,6,22.5,0.6,7.5,12,,,10,,,200000,\n"
                "openai,gpt-y,2025-01-01,2,8,0.5,,,40,80,,0.002,flex,,\n")


def test_a_bom_opening_pricing_csv_loads_as_if_absent(tmp_path):
    from proxy.overrides import load_overrides

    (tmp_path / "plain").mkdir()
    (tmp_path / "bom").mkdir()
    (tmp_path / "plain" / "pricing.csv").write_bytes(PRICING_TEXT.encode())
    (tmp_path / "bom" / "pricing.csv").write_bytes(BOM + PRICING_TEXT.encode())
    plain, plain_problems = load_overrides(tmp_path / "plain" / "pricing.csv")
    with_bom, problems = load_overrides(tmp_path / "bom" / "pricing.csv")
    assert (problems, plain_problems) == ([], [])
    assert with_bom.rows == plain.rows and [r.line for r in with_bom.rows] == [3, 4, 5]
    claude = OverrideBook(with_bom).price_at("anthropic", "claude-x", at("2025-06-01T00:00:00+00:00"))
    assert (claude.input, claude.output, claude.max_output_tokens) == (Decimal(3), Decimal(15), 64000)
    assert [(t, p.input) for t, p in claude.long_context] == [(200_000, Decimal(6))]


def test_a_bom_on_a_later_line_of_pricing_csv_is_not_special(tmp_path):
    path = tmp_path / "pricing.csv"
    path.write_bytes(BOM + PRICING_TEXT.encode() + BOM + b"openai,gpt-z,2025-01-01,1,2,,,,,,,,,,\n")
    book, problems = load_pricebook(path)
    assert problems == []  # the provider is "\ufeffopenai", text like any other: it names no OpenAI model
    assert book.models() == ["anthropic/claude-x", "openai/gpt-y", "\ufeffopenai/gpt-z"]
    assert book.price_at("openai", "gpt-z", at("2025-06-01T00:00:00+00:00")) is None


ABSURD = [
    # every rate column: finite, >= 0, at most 1,000,000 USD (per Mtok, per 1,000 searches, per request)
    ("openai,m,2025-01-01,1e30,2,,,,,,,,,,",
     "input_usd_per_mtok 1e30 is out of range: it must be a number >= 0 and at most 1000000"),
    ("openai,m,2025-01-01,1,1000000.01,,,,,,,,,,",
     "output_usd_per_mtok 1000000.01 is out of range: it must be a number >= 0 and at most 1000000"),
    ("openai,m,2025-01-01,1,2,1e7,,,,,,,,,",
     "cached_input_usd_per_mtok 1e7 is out of range: it must be a number >= 0 and at most 1000000"),
    ("openai,m,2025-01-01,1,2,,1e400,,,,,,,,",
     "cache_write_usd_per_mtok 1e400 is out of range: it must be a number >= 0 and at most 1000000"),
    ("openai,m,2025-01-01,1,2,,,2000000,,,,,,,",
     "cache_write_1h_usd_per_mtok 2000000 is out of range: it must be a number >= 0 and at most 1000000"),
    ("openai,m,2025-01-01,1,2,,,,1E+30,,,,,,",
     "input_audio_usd_per_mtok 1E+30 is out of range: it must be a number >= 0 and at most 1000000"),
    ("openai,m,2025-01-01,1,2,,,,,-1,,,,,",
     "output_audio_usd_per_mtok -1 is out of range: it must be a number >= 0 and at most 1000000"),
    ("openai,m,2025-01-01,1,2,,,,,,1e30,,,,",
     "web_search_usd_per_kcall 1e30 is out of range: it must be a number >= 0 and at most 1000000"),
    ("openai,m,2025-01-01,1,2,,,,,,,1e30,,,",
     "request_usd 1e30 is out of range: it must be a number >= 0 and at most 1000000"),
    ("openai,m,2025-01-01,NaN,2,,,,,,,,,,",
     "input_usd_per_mtok 'NaN' is not a number: it must be a number >= 0 and at most 1000000"),
    ("openai,m,2025-01-01,1,Infinity,,,,,,,,,,",
     "output_usd_per_mtok 'Infinity' is not a number: it must be a number >= 0 and at most 1000000"),
    ("openai,m,2025-01-01,1,2,-Infinity,,,,,,,,,",
     "cached_input_usd_per_mtok '-Infinity' is not a number: it must be a number >= 0 and at most 1000000"),
    ("openai,m,2025-01-01,1,2,,,,,,,sNaN,,,",
     "request_usd 'sNaN' is not a number: it must be a number >= 0 and at most 1000000"),
    # token thresholds: whole numbers, at most 100,000,000
    ("openai,m,2025-01-01,1,2,,,,,,,,,100000001,",
     "prompt_tokens_above 100000001 is out of range: it must be a whole number >= 0 and at most 100000000"),
    ("openai,m,2025-01-01,1,2,,,,,,,,,,99999999999999999999",
     "max_output_tokens 99999999999999999999 is out of range: it must be a whole number >= 0 and at most "
     "100000000"),
    ("openai,m,2025-01-01,1,2,,,,,,,,,,1e5",
     "max_output_tokens '1e5' is not a whole number of tokens: it must be a whole number >= 0 and at most "
     "100000000"),
    ("openai,m,2025-01-01,1,2,,,,,,,,,,²",  # a digit to str.isdigit, yet no number (it used to crash the loader)
     "max_output_tokens '²' is not a number: it must be a whole number >= 0 and at most 100000000"),
]


@pytest.mark.parametrize("row, message", ABSURD, ids=[f"{i}-{m.split()[0]}" for i, (_, m) in enumerate(ABSURD)])
def test_absurd_numbers_are_refused_saying_what_is_allowed(tmp_path, row, message):
    path = write_prices(tmp_path, "openai,good,2025-01-01,1,2,,,,,,,,,,", row, header=FULL_HEADER)
    book, problems = load_pricebook(path)
    assert problems == [Problem("pricing.csv", 3, message)]
    assert str(problems[0]) == f"pricing.csv:3: error: {message}"
    assert book.models() == ["openai/good"]


def test_the_largest_and_smallest_numbers_allowed_load(tmp_path):
    path = write_prices(tmp_path, "openai,m,2025-01-01,1000000,1000000,1000000,1000000,1000000,1000000,1000000,"
                                  "1000000,1000000,,,100000000",
                        "openai,m,2025-01-01,1000000,1000000,,,,,,,,,100000000,",
                        "openai,z,2025-01-01,0,0,0,0,0,0,0,0,0,,0,0", header=FULL_HEADER)
    book, problems = load_pricebook(path)
    assert problems == []
    when = at("2025-06-01T00:00:00+00:00")
    top = book.price_at("openai", "m", when)
    assert (top.input, top.output, top.cached_input, top.cache_write, top.cache_write_1h, top.input_audio,
            top.output_audio, top.web_search_per_k, top.request_fee, top.max_output_tokens) == (
        *[Decimal(1_000_000)] * 9, 100_000_000)
    assert [(t, p.input) for t, p in top.long_context] == [(100_000_000, Decimal(1_000_000))]
    zero = book.price_at("openai", "z", when)
    assert (zero.input, zero.request_fee, zero.max_output_tokens, zero.long_context) == (Decimal(0), Decimal(0), 0, ())
