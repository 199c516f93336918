"""`tollway pricing show` and `tollway pricing check`, through the real CLI in a subprocess.

Every expected price is typed from the providers' published price lists (as the pinned price book
carries them), never computed by the code under test.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from proxy.events import Event
from proxy.recorder import EventRecorder, open_events_db
from tests.helpers import Deployment, GatewayProcess, run_cli

AZURE = ('[providers.azure]\nbase_url = "http://127.0.0.1:9"\nstyle = "azure"\n'
         '[providers.azure.deployments]\nprod-4o = "gpt-4o"\n')
BOOK = re.compile(r"genai-prices \d+\.\d+\.\d+")


@pytest.fixture
def dep(tmp_path) -> Deployment:
    return Deployment(tmp_path / "deploy", "http://127.0.0.1:9")


def show(dep: Deployment, model: str, *extra: str) -> dict:
    result = run_cli(dep.path, "pricing", "show", model, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def check(dep: Deployment, *extra: str, expect: int) -> dict:
    result = run_cli(dep.path, "pricing", "check", "--json", *extra)
    assert result.returncode == expect, result.stdout + result.stderr
    return json.loads(result.stdout)


def rates(price: dict, *names: str) -> tuple[Decimal, ...]:
    return tuple(Decimal(price[name]) for name in names)


def append(path, *lines: str) -> list[int]:
    """Append lines to a file; return their line numbers."""
    text = path.read_text()
    if not text.endswith("\n"):
        text += "\n"
    first = len(text.splitlines()) + 1
    path.write_text(text + "".join(f"{line}\n" for line in lines))
    return list(range(first, first + len(lines)))


def event(model: str, days_ago: float = 1, cost: str | None = None, tenant: str | None = "acme") -> Event:
    """One answered request as the gateway records it; `cost` None: it had no price."""
    return Event(uuid.uuid4(), datetime.now(UTC) - timedelta(days=days_ago), tenant, None, "token",
                 model.split("/", 1)[0], model, "chat/completions", status_code=200, outcome="ok",
                 billing_mode="unified", input_tokens=100, output_tokens=10, usage_source="reported",
                 cost_usd=Decimal(cost) if cost else None, attempts=1)


def write_events(dep: Deployment, events: list[Event]) -> None:
    con = open_events_db(dep.path / "events.duckdb")
    recorder = EventRecorder(con, flush_interval_ms=50)
    for e in events:
        recorder.record(e)
    recorder.close()
    con.close()
    assert recorder.written == len(events)


# --- show ---------------------------------------------------------------------------------------
def test_show_a_dated_snapshot_prices_it_as_its_book_model_with_every_rate(dep):
    result = run_cli(dep.path, "pricing", "show", "anthropic/claude-sonnet-4-5-20250929")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("anthropic/claude-sonnet-4-5-20250929\n")
    assert "priced as      claude-sonnet-4-5\n" in out
    assert BOOK.search(out) and "price book" in out
    for line in ("input            $3 per Mtok", "output           $15 per Mtok", "cached input     $0.3 per Mtok",
                 "cache write 5m   $3.75 per Mtok", "cache write 1h   $6 per Mtok"):
        assert line in out
    assert "above 200000 prompt tokens: input $6, output $22.5," in out
    assert re.search(r"^  batch +input \$1\.5, output \$7\.5,", out, re.M)

    doc = show(dep, "anthropic/claude-sonnet-4-5-20250929")
    assert doc["priced_as"] == "claude-sonnet-4-5" and BOOK.fullmatch(doc["source"])
    assert doc["override_lines"] == [] and doc["shadowed_book_price"] is None
    price = doc["price"]
    assert rates(price, "input", "output", "cached_input", "cache_write", "cache_write_1h") == (
        Decimal("3"), Decimal("15"), Decimal("0.30"), Decimal("3.75"), Decimal("6"))
    assert price["input_audio"] is None and price["request_fee"] is None and price["effective_from"] is None
    [tier] = price["long_context"]
    assert tier["prompt_tokens_above"] == 200000
    assert rates(tier, "input", "output") == (Decimal("6"), Decimal("22.50"))
    assert set(doc["variants"]) == {"batch"}  # Anthropic has no flex or priority tier prices
    assert rates(doc["variants"]["batch"], "input", "output") == (Decimal("1.50"), Decimal("7.50"))


def test_show_lists_service_tier_variants_that_differ(dep):
    doc = show(dep, "openai/gpt-5")
    assert rates(doc["price"], "input", "output", "cached_input") == (Decimal("1.25"), Decimal("10"), Decimal("0.125"))
    assert rates(doc["variants"]["flex"], "input", "output") == (Decimal("0.625"), Decimal("5"))
    assert rates(doc["variants"]["priority"], "input", "output") == (Decimal("2.50"), Decimal("20"))
    assert rates(doc["variants"]["batch"], "input", "output") == (Decimal("0.625"), Decimal("5"))
    out = run_cli(dep.path, "pricing", "show", "openai/gpt-5").stdout
    assert re.search(r"^  flex +input \$0\.625, output \$5,", out, re.M)


def test_show_a_long_context_tier(dep):
    doc = show(dep, "gemini/gemini-2.5-pro")
    assert rates(doc["price"], "input", "output") == (Decimal("1.25"), Decimal("10"))
    [tier] = doc["price"]["long_context"]
    assert tier["prompt_tokens_above"] == 200000
    assert rates(tier, "input", "output") == (Decimal("2.50"), Decimal("15"))


def test_show_an_alias(dep):
    doc = show(dep, "openai/chatgpt-4o-latest")
    assert doc["priced_as"] == "chatgpt-4o-latest" and BOOK.fullmatch(doc["source"])
    assert rates(doc["price"], "input", "output") == (Decimal("5"), Decimal("15"))


def test_an_override_wins_and_the_shadowed_book_price_is_shown(dep):
    [line] = append(dep.path / "pricing.csv", "openai,gpt-4o-mini,2025-01-01,0.10,0.40,,")
    doc = show(dep, "openai/gpt-4o-mini")
    assert doc["source"] == "override" and doc["override_lines"] == [line]
    assert doc["override"] == "openai/gpt-4o-mini" and doc["priced_as"] == "gpt-4o-mini"
    assert rates(doc["price"], "input", "output") == (Decimal("0.10"), Decimal("0.40"))
    assert doc["price"]["effective_from"] == "2025-01-01" and doc["price"]["cached_input"] is None
    assert doc["variants"] == {}  # the override has no tier rows: every tier bills at it
    shadowed = doc["shadowed_book_price"]
    assert shadowed["model"] == "gpt-4o-mini" and BOOK.fullmatch(shadowed["source"])
    assert rates(shadowed["price"], "input", "output") == (Decimal("0.15"), Decimal("0.60"))

    out = run_cli(dep.path, "pricing", "show", "openai/gpt-4o-mini").stdout
    assert f"override: pricing.csv line(s) {line}, the row effective from 2025-01-01" in out
    assert "input            $0.1 per Mtok" in out
    assert re.search(r"shadows +genai-prices [\d.]+ as gpt-4o-mini: input \$0\.15, output \$0\.6,", out)


def test_before_an_override_takes_effect_the_book_price_applies(dep):
    [line] = append(dep.path / "pricing.csv", "openai,gpt-4o-mini,2025-01-01,0.10,0.40,,")
    doc = show(dep, "openai/gpt-4o-mini", "--at", "2024-12-31")
    assert BOOK.fullmatch(doc["source"]) and doc["override_lines"] == [line] and doc["at"] == "2024-12-31"
    assert rates(doc["price"], "input", "output") == (Decimal("0.15"), Decimal("0.60"))
    out = run_cli(dep.path, "pricing", "show", "openai/gpt-4o-mini", "--at", "2024-12-31").stdout
    assert f"pricing.csv line(s) {line} name it, but none is in force at 2024-12-31" in out


def test_show_an_azure_deployment_prices_the_model_it_serves(dep):
    append(dep.path / "tollway.toml", AZURE)
    doc = show(dep, "azure/prod-4o")
    assert doc["deployment_model"] == "gpt-4o" and doc["book_provider"] == "azure"
    assert doc["priced_as"] == "gpt-4o" and BOOK.fullmatch(doc["source"])
    assert rates(doc["price"], "input", "output", "cached_input") == (Decimal("2.50"), Decimal("10"), Decimal("1.25"))
    out = run_cli(dep.path, "pricing", "show", "azure/prod-4o").stdout
    assert "deployment     prod-4o serves gpt-4o (tollway.toml)" in out


def test_an_unpriced_model_exits_1_and_says_how_to_price_it(dep):
    result = run_cli(dep.path, "pricing", "show", "openai/gpt-unknown-1")
    assert result.returncode == 1 and result.stdout == ""
    assert "error: openai/gpt-unknown-1 has no price" in result.stderr
    assert str(dep.path / "pricing.csv") in result.stderr
    assert ("provider,model,effective_from,input_usd_per_mtok,output_usd_per_mtok,cached_input_usd_per_mtok,"
            "cache_write_usd_per_mtok") in result.stderr
    assert re.search(r"^  openai,gpt-unknown-1,\d{4}-\d\d-\d\d,[\d.]+,[\d.]+,,$", result.stderr, re.M)

    result = run_cli(dep.path, "pricing", "show", "openai/gpt-unknown-1", "--json")
    assert result.returncode == 1 and "pricing.csv" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"] == "openai/gpt-unknown-1" and doc["price"] is None and doc["source"] is None


def test_show_refuses_an_unknown_provider_a_bare_model_and_a_bad_date(dep):
    result = run_cli(dep.path, "pricing", "show", "mistral/mistral-large")
    assert result.returncode == 1
    assert "unknown provider 'mistral'" in result.stderr and "anthropic, gemini, openai" in result.stderr
    result = run_cli(dep.path, "pricing", "show", "gpt-4o")
    assert result.returncode == 1 and "provider/model" in result.stderr
    result = run_cli(dep.path, "pricing", "show", "openai/gpt-4o", "--at", "May 1st")
    assert result.returncode == 1 and "--at" in result.stderr


# --- check --------------------------------------------------------------------------------------
def test_check_passes_when_every_model_is_priced(dep):
    write_events(dep, [event("openai/gpt-4o-mini", cost="0.000021"), event("anthropic/claude-sonnet-4-5")])
    result = run_cli(dep.path, "pricing", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every model used in the last 30 day(s) or named in the policy has a price" in result.stdout
    assert "events.duckdb" in result.stderr
    assert check(dep, expect=0) == {"days": 30, "unpriced": [], "shadowing_overrides": [], "problems": []}


def test_check_lists_unpriced_models_from_events_and_from_the_policy(dep):
    write_events(dep, [
        *(event("openai/gpt-unknown-2") for _ in range(3)),
        event("openai/gpt-4o-mini", cost="0.000021"),
        event("openai/gpt-old-unknown", days_ago=40),  # outside the default 30 days
        event("openai/typed-by-a-stranger", tenant=None),  # unauthenticated: not a model in use
    ])
    [access] = append(dep.path / "policy" / "access.csv", "p, *, acme, openai/gpt-unknown-1, allow")
    [route] = append(dep.path / "policy" / "routes.csv", "p, *, openai/gpt-unknown-2, operator-openai")

    doc = check(dep, expect=1)
    assert doc["unpriced"] == [
        {"model": "openai/gpt-unknown-1", "requests": 0, "seen_in": [f"policy/access.csv:{access}"]},
        {"model": "openai/gpt-unknown-2", "requests": 3, "seen_in": ["events", f"policy/routes.csv:{route}"]},
    ]
    assert doc["problems"] == []

    result = run_cli(dep.path, "pricing", "check")
    assert result.returncode == 1
    assert re.search(rf"^openai/gpt-unknown-1 +0  policy/access\.csv:{access}$", result.stdout, re.M)
    assert re.search(rf"^openai/gpt-unknown-2 +3  events, policy/routes\.csv:{route}$", result.stdout, re.M)
    assert "2 model(s) have no price" in result.stderr and "pricing.csv" in result.stderr

    wider = check(dep, "--days", "60", expect=1)
    assert {"model": "openai/gpt-old-unknown", "requests": 1, "seen_in": ["events"]} in wider["unpriced"]


def test_check_lists_overrides_that_shadow_the_book_and_fails_on_pricing_errors(dep):
    [line] = append(dep.path / "pricing.csv", "openai,gpt-4o,2025-01-01,2.00,8.00,1.00,")
    result = run_cli(dep.path, "pricing", "check")
    assert result.returncode == 0, result.stdout + result.stderr  # informational only
    assert re.search(rf"pricing\.csv:{line} openai/gpt-4o overrides genai-prices [\d.]+ "
                     r"\(book: \$2\.5 in / \$10 out per Mtok\)", result.stdout)

    [bad] = append(dep.path / "pricing.csv", "openai,gpt-4o-mini,someday,0.10,0.40,,")
    doc = check(dep, expect=1)
    assert doc["unpriced"] == []
    assert doc["problems"] == [f"pricing.csv:{bad}: error: effective_from 'someday' is not a date like 2025-01-31"]
    [shadow] = doc["shadowing_overrides"]
    assert shadow["line"] == line and shadow["model"] == "openai/gpt-4o" and shadow["service_tier"] is None
    [book] = shadow["book"]
    assert book["model"] == "gpt-4o" and rates(book["price"], "input", "output") == (Decimal("2.50"), Decimal("10"))
    result = run_cli(dep.path, "pricing", "check")
    assert result.returncode == 1 and f"pricing.csv:{bad}: error:" in result.stdout


def test_check_reads_the_gateways_fresh_report_while_the_gateway_holds_the_events(dep):
    dep.add_test_keys()
    write_events(dep, [*(event("openai/gpt-unknown-2") for _ in range(3)), event("openai/gpt-4o-mini", cost="0.0001")])
    gateway = GatewayProcess(dep).start()
    try:
        result = run_cli(dep.path, "pricing", "check", "--json")
    finally:
        gateway.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "held by the running gateway" in result.stderr and "tenant_costs.parquet" in result.stderr
    assert json.loads(result.stdout)["unpriced"] == [
        {"model": "openai/gpt-unknown-2", "requests": 3, "seen_in": ["events"]}]
    assert (dep.path / "reports" / "tenant_costs.parquet").exists()


# --- pricing.csv as Excel saves it; absurd rates --------------------------------------------------------
def test_a_bom_opening_pricing_csv_is_ignored_and_an_absurd_rate_is_an_error(dep):
    path = dep.path / "pricing.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    [line, bad] = append(path, "openai,gpt-4o-mini,2025-01-01,0.10,0.40,,", "openai,gpt-4o,2025-01-01,1e30,8.00,,")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf# Price OVERRIDES.")
    doc = show(dep, "openai/gpt-4o-mini")
    assert doc["source"] == "override" and doc["override_lines"] == [line]
    assert rates(doc["price"], "input", "output") == (Decimal("0.10"), Decimal("0.40"))
    doc = check(dep, expect=1)
    assert doc["problems"] == [f"pricing.csv:{bad}: error: input_usd_per_mtok 1e30 is out of range: it must be a "
                               "number >= 0 and at most 1000000"]
    assert BOOK.fullmatch(show(dep, "openai/gpt-4o")["source"])  # the refused row is left out: the book prices it
