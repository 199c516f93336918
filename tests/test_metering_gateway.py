"""Metering on real traffic (issue 14): every billable dimension through a real `tollway serve` and the
simulated providers, JSON and SSE, for each provider where the dimension exists.

Each expected cost is worked out here, by hand, from list prices typed into this file (looked up in
the pinned book, genai-prices 0.2.5, and in the overrides written below): USD per million tokens,
cost = sum(tokens x rate) / 1e6 + per-call fees, exact, rounded half-up to a nano-dollar. Tollway's
own pricing code is never called. The semantics (canonical usage): input includes cached reads and
cache writes; cached reads at the cached rate, cache writes at the 5-minute rate except their 1-hour
part at the 1-hour rate; audio input (part of input) at the audio rate; output includes reasoning;
a long-context tier is chosen by the whole prompt (cache included) and then prices every token; web
searches cost the per-1,000 fee each; Gemini 2.x grounding is billed once per grounded response.

Two gateways, each started once: one in the default `unpriced = "refuse"` mode (with overrides in
the extended pricing.csv format), one with `[metering] unpriced = "allow"` (and a pricing.csv in the
old seven-column format). acme has a usd limit; globex has none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date
from decimal import ROUND_HALF_UP, Decimal

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from tests.helpers import ROUTES, SIM_KEYS, Deployment, GatewayProcess

pytestmark = pytest.mark.timeout(120)

BOOK = "genai-prices 0.2.5"
OVERRIDE = "override"
REQUEST_ID = "x-tollway-request-id"
COST = "x-tollway-cost-usd"
TAG = "x-test-case"  # forwarded upstream: tells which case a simulator request belongs to
NANO = Decimal("0.000000001")


# --- list prices, USD per million tokens (per 1,000 calls for search fees), typed in --------------
@dataclass(frozen=True)
class Rates:
    inp: str
    out: str
    cached: str | None = None
    cw: str | None = None  # 5-minute cache writes
    cw1h: str | None = None  # 1-hour cache writes
    audio_in: str | None = None
    search_k: str | None = None  # per 1,000 web searches / grounded prompts
    request: str | None = None  # per request


# genai-prices 0.2.5, provider anthropic, claude-sonnet-4-5 (long-context tier above 200,000 prompt tokens)
SONNET = Rates("3", "15", cached="0.30", cw="3.75", cw1h="6", search_k="10")
SONNET_LONG = Rates("6", "22.5", cached="0.6", cw="7.5", cw1h="12", search_k="10")
# provider openai
GPT_4O = Rates("2.5", "10", cached="1.25", search_k="10")
GPT_4O_AUDIO = Rates("2.5", "10", audio_in="2.5")  # the book has no audio rate for gpt-4o: input rate
GPT_5 = Rates("1.25", "10", cached="0.125")
GPT_5_FLEX = Rates("0.625", "5", cached="0.0625")  # service_tier flex (in force from 2026-10-12)
GPT_5_PRIORITY = Rates("2.5", "20", cached="0.25")  # service_tier priority (from 2026-10-12)
CHATGPT_4O_LATEST = Rates("5", "15")
# provider google: gemini-2.5-pro (tier above 200,000 prompt tokens), gemini-2.5-flash
GEMINI_PRO = Rates("1.25", "10", cached="0.125", search_k="35")
GEMINI_PRO_LONG = Rates("2.5", "15", cached="0.25", search_k="35")
GEMINI_FLASH = Rates("0.3", "2.5", cached="0.03", audio_in="1.0", search_k="35")
# gemini-flash-latest is an alias of gemini-3.8-flash in the book; its price rises on 2027-01-01.
# Gemini 3 grounding is billed per search query.
GEMINI_FLASH_LATEST = {date.min: Rates("0.75", "3.75", cached="0.075", search_k="14"),
                       date(2027, 1, 1): Rates("1.5", "7.5", cached="0.15", search_k="14")}

# --- the operator's overrides ---------------------------------------------------------------------
EXTENDED_HEADER = ("provider,model,effective_from,input_usd_per_mtok,output_usd_per_mtok,cached_input_usd_per_mtok,"
                   "cache_write_usd_per_mtok,cache_write_1h_usd_per_mtok,input_audio_usd_per_mtok,"
                   "output_audio_usd_per_mtok,web_search_usd_per_kcall,request_usd,service_tier,prompt_tokens_above")
PRICING_EXTENDED = EXTENDED_HEADER + """
openai,gpt-4o-mini,2025-01-01,0.10,0.40,0.05,,,,,,,,
openai,ft:gpt-4o-mini-2024-07-18:*,2025-01-01,0.2,0.8,,,,,,,,,
house,house-llm-*,2025-01-01,1.00,2.00,0.10,,,,,,0.001,,
house,house-llm-*,2025-01-01,3.00,6.00,0.30,,,,,,0.002,,100000
house,house-llm-*,2025-01-01,0.50,1.00,0.05,,,,,,,flex,
anthropic,claude-house-*,2025-01-01,2.00,10.00,0.20,2.50,4.00,,,5,,,
gemini,gemini-house-*,2025-01-01,0.20,0.60,0.02,,,0.70,,,,,
"""
PRICING_OLD_FORMAT = ("provider,model,effective_from,input_usd_per_mtok,output_usd_per_mtok,"
                      "cached_input_usd_per_mtok,cache_write_usd_per_mtok") + """
openai,gpt-4o-mini,2025-01-01,0.10,0.40,0.05,
openai,ft:gpt-4o-mini-2024-07-18:*,2025-01-01,0.2,0.8,,
"""
MINI_OVERRIDE = Rates("0.10", "0.40", cached="0.05")
FT_OVERRIDE = Rates("0.2", "0.8", cached="0.2")  # blank cached price: cached tokens at the input price
FT_GLOB = "ft:gpt-4o-mini-2024-07-18:*"
HOUSE = Rates("1.00", "2.00", cached="0.10", request="0.001")
HOUSE_LONG = Rates("3.00", "6.00", cached="0.30", request="0.002")
HOUSE_FLEX = Rates("0.50", "1.00", cached="0.05")
CLAUDE_HOUSE = Rates("2.00", "10.00", cached="0.20", cw="2.50", cw1h="4.00", search_k="5")
GEMINI_HOUSE = Rates("0.20", "0.60", cached="0.02", audio_in="0.70")


# --- what the simulated provider reports ----------------------------------------------------------
@dataclass(frozen=True)
class Sim:
    """Usage the simulator is told to report. `fresh`: prompt tokens neither read from nor written to
    the cache; `out`: visible output (reasoning comes on top); audio parts are inside fresh / out."""

    fresh: int = 1000
    out: int = 200
    cached: int = 0
    cw: int = 0
    cw1h: int = 0
    reasoning: int = 0
    audio_in: int = 0
    audio_out: int = 0
    searches: int = 0
    response_model: str | None = None

    def headers(self) -> dict[str, str]:
        values = {"input-tokens": self.fresh, "output-tokens": self.out, "cached-tokens": self.cached,
                  "cache-write-tokens": self.cw, "cache-write-1h-tokens": self.cw1h,
                  "reasoning-tokens": self.reasoning, "audio-input-tokens": self.audio_in,
                  "audio-output-tokens": self.audio_out, "web-searches": self.searches}
        headers = {f"x-sim-{k}": str(v) for k, v in values.items() if v or k in ("input-tokens", "output-tokens")}
        if self.response_model:
            headers["x-sim-response-model"] = self.response_model
        return headers


def bill(r: Rates, s: Sim, calls: int) -> Decimal:
    """The cost by hand: each kind of token at its own typed rate, then the per-call fees."""
    parts = [(s.fresh - s.audio_in, r.inp), (s.audio_in, r.audio_in), (s.cached, r.cached), (s.cw, r.cw),
             (s.cw1h, r.cw1h), (s.out + s.reasoning, r.out)]
    tokens = sum((Decimal(n) * Decimal(rate) for n, rate in parts if n), Decimal(0))
    fees = Decimal(calls) * Decimal(r.search_k) / 1000 if calls else Decimal(0)
    fees += Decimal(r.request or 0)
    return (tokens / 1_000_000 + fees).quantize(NANO, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Case:
    id: str
    api: str  # chat | responses | messages | gemini | house (an OpenAI-style custom provider)
    model: str
    sim: Sim = Sim()
    rates: Rates | dict | None = None  # None: unpriced (NULL cost)
    priced: str | tuple | None = None  # the event's priced_model (a tuple: any of these)
    source: str | None = BOOK
    who: str = "alice"  # alice: acme (usd limit); carol: globex (no usd limit)
    body: dict = field(default_factory=dict)
    calls: int | None = None  # billed search calls, when not one per search

    @property
    def provider(self) -> str:
        return {"chat": "openai", "responses": "openai", "messages": "anthropic"}.get(self.api, self.api)

    def billed_calls(self) -> int:
        return self.sim.searches if self.calls is None else self.calls

    def tier(self) -> str | None:
        """The service tier the response reports (the simulator echoes OpenAI's request body)."""
        return {"messages": "standard", "gemini": None}.get(self.api, self.body.get("service_tier", "default"))

    def columns(self) -> dict:
        """The event's usage columns (0 and NULL alike where a provider does not report a dimension)."""
        s, anthropic_style = self.sim, self.api == "messages"
        writes = s.cw + s.cw1h if anthropic_style else 0
        return {"input_tokens": s.fresh + s.cached + writes, "output_tokens": s.out + s.reasoning,
                "cached_input_tokens": s.cached, "cache_write_tokens": writes,
                "cache_write_1h_tokens": s.cw1h if anthropic_style else 0, "reasoning_tokens": s.reasoning,
                "input_audio_tokens": s.audio_in, "output_audio_tokens": s.audio_out,
                "web_search_calls": self.billed_calls()}

    def expected_cost(self, day: date) -> Decimal | None:
        rates = self.rates
        if isinstance(rates, dict):  # dated list prices: the row in force on the request's day
            rates = rates[max(d for d in rates if d <= day)]
        return None if rates is None else bill(rates, self.sim, self.billed_calls())


def book(case_id, api, model, sim, rates, priced, **kw) -> Case:
    return Case(case_id, api, model, sim, rates, priced, BOOK, **kw)


def unpriced(case_id, api, model, who="carol") -> Case:
    return Case(case_id, api, model, Sim(fresh=700, out=90), None, None, None, who=who)


FLEX, PRIORITY = {"service_tier": "flex"}, {"service_tier": "priority"}
CASES = [
    # (1) dated snapshot ids priced as their model
    book("dated-claude", "messages", "claude-sonnet-4-5-20250929", Sim(1200, 300), SONNET, "claude-sonnet-4-5"),
    book("dated-gpt-4o", "chat", "gpt-4o-2024-08-06", Sim(1000, 200, cached=400), GPT_4O, "gpt-4o"),
    book("dated-gpt-5-responses", "responses", "gpt-5-2025-08-07", Sim(900, 150, cached=100, reasoning=50),
         GPT_5, "gpt-5"),
    # (2) aliases
    book("alias-chatgpt-4o-latest", "chat", "chatgpt-4o-latest", Sim(1000, 200), CHATGPT_4O_LATEST,
         "chatgpt-4o-latest"),
    book("alias-gemini-flash-latest", "gemini", "gemini-flash-latest", Sim(1000, 200, cached=300),
         GEMINI_FLASH_LATEST, "gemini-3.8-flash"),
    # (3) an unknown request model priced by the model the response names (globex: no usd limit)
    book("response-model-openai", "chat", "my-house-alias", Sim(800, 120, response_model="gpt-4o-2024-11-20"),
         GPT_4O, "gpt-4o", who="carol"),
    book("response-model-anthropic", "messages", "my-claude-alias",
         Sim(800, 120, response_model="claude-sonnet-4-5-20250929"), SONNET, "claude-sonnet-4-5", who="carol"),
    book("response-model-gemini", "gemini", "my-gemini-alias", Sim(800, 120, response_model="gemini-2.5-flash"),
         GEMINI_FLASH, "gemini-2.5-flash", who="carol"),
    # (4) long context: the tier is chosen by the whole prompt and prices every token
    book("long-claude-250k", "messages", "claude-sonnet-4-5", Sim(250_000, 100), SONNET_LONG, "claude-sonnet-4-5"),
    book("long-claude-cache-210k", "messages", "claude-sonnet-4-5", Sim(150_000, 100, cached=40_000, cw=20_000),
         SONNET_LONG, "claude-sonnet-4-5"),
    book("base-claude-150k", "messages", "claude-sonnet-4-5", Sim(150_000, 100), SONNET, "claude-sonnet-4-5"),
    book("long-gemini-pro-250k", "gemini", "gemini-2.5-pro", Sim(250_000, 100), GEMINI_PRO_LONG, "gemini-2.5-pro"),
    book("long-gemini-pro-cache-210k", "gemini", "gemini-2.5-pro", Sim(190_000, 100, cached=20_000),
         GEMINI_PRO_LONG, "gemini-2.5-pro"),
    book("base-gemini-pro-150k", "gemini", "gemini-2.5-pro", Sim(150_000, 100), GEMINI_PRO, "gemini-2.5-pro"),
    # (5) Anthropic 5-minute and 1-hour cache writes
    book("claude-cache-5m-1h", "messages", "claude-sonnet-4-5", Sim(100, 200, cached=500, cw=1000, cw1h=2000),
         SONNET, "claude-sonnet-4-5"),
    # (6) OpenAI service tiers (odd counts: the flex cost ends in ...8125 and rounds half-up)
    book("gpt-5-chat-flex", "chat", "gpt-5", Sim(1001, 7, cached=3), GPT_5_FLEX, "gpt-5", body=FLEX),
    book("gpt-5-chat-priority", "chat", "gpt-5", Sim(1000, 300, cached=200), GPT_5_PRIORITY, "gpt-5", body=PRIORITY),
    book("gpt-5-responses-flex", "responses", "gpt-5", Sim(2000, 100, cached=500, reasoning=40), GPT_5_FLEX,
         "gpt-5", body=FLEX),
    book("gpt-5-responses-priority", "responses", "gpt-5", Sim(2000, 100, cached=500, reasoning=40),
         GPT_5_PRIORITY, "gpt-5", body=PRIORITY),
    # (7) search fees
    book("claude-web-search", "messages", "claude-sonnet-4-5", Sim(1500, 250, searches=3), SONNET,
         "claude-sonnet-4-5"),
    book("gpt-4o-responses-web-search", "responses", "gpt-4o", Sim(1500, 250, searches=2), GPT_4O, "gpt-4o"),
    book("gemini-2.5-grounding-per-prompt", "gemini", "gemini-2.5-flash", Sim(1500, 250, searches=3),
         GEMINI_FLASH, "gemini-2.5-flash", calls=1),
    book("gemini-3-grounding-per-query", "gemini", "gemini-flash-latest", Sim(1500, 250, searches=2),
         GEMINI_FLASH_LATEST, "gemini-3.8-flash"),
    # (8) audio
    book("gemini-flash-audio", "gemini", "gemini-2.5-flash", Sim(1000, 100, audio_in=400), GEMINI_FLASH,
         "gemini-2.5-flash"),
    book("gpt-4o-chat-audio-at-text-rates", "chat", "gpt-4o", Sim(1000, 200, audio_in=300, audio_out=50),
         GPT_4O_AUDIO, "gpt-4o"),
    # (9) overrides win over the book (gpt-4o-mini and the fine-tune are in the book too)
    Case("override-gpt-4o-mini", "chat", "gpt-4o-mini", Sim(1000, 200, cached=400), MINI_OVERRIDE,
         "gpt-4o-mini", OVERRIDE),
    Case("override-fine-tune-glob", "chat", "ft:gpt-4o-mini-2024-07-18:acme::abc123", Sim(1000, 200, cached=100),
         FT_OVERRIDE, ("ft:gpt-4o-mini-2024-07-18:acme::abc123", FT_GLOB), OVERRIDE),
    Case("override-house-request-fee", "house", "house-llm-1", Sim(1000, 100, cached=200), HOUSE,
         ("house-llm-1", "house-llm-*"), OVERRIDE),
    Case("override-house-long-context", "house", "house-llm-1", Sim(120_000, 100), HOUSE_LONG,
         ("house-llm-1", "house-llm-*"), OVERRIDE),
    Case("override-house-flex-tier", "house", "house-llm-1", Sim(1000, 100), HOUSE_FLEX,
         ("house-llm-1", "house-llm-*"), OVERRIDE, body=FLEX),
    Case("override-claude-house-writes-search", "messages", "claude-house-1",
         Sim(100, 200, cached=500, cw=1000, cw1h=2000, searches=2), CLAUDE_HOUSE,
         ("claude-house-1", "claude-house-*"), OVERRIDE),
    Case("override-gemini-house-audio", "gemini", "gemini-house-1", Sim(1000, 100, audio_in=300), GEMINI_HOUSE,
         ("gemini-house-1", "gemini-house-*"), OVERRIDE),
    # (10), (11) unpriced without a usd limit: served and recorded with a NULL cost (never at base price)
    unpriced("unpriced-no-limit-openai", "chat", "gpt-unknown-9"),
    unpriced("unpriced-no-limit-anthropic", "messages", "claude-unknown-9"),
    unpriced("unpriced-no-limit-gemini", "gemini", "gemini-unknown-9"),
    unpriced("fine-tune-without-book-price-no-limit", "chat", "ft:gpt-4.1-2025-04-14:acme::abc"),
]
# Under acme's usd limit in the default mode: refused before the provider sees them.
REFUSED = [("refuse-openai-chat", "chat", "gpt-unknown-9"), ("refuse-openai-responses", "responses", "gpt-unknown-9"),
           ("refuse-anthropic", "messages", "claude-unknown-9"), ("refuse-gemini", "gemini", "gemini-unknown-9"),
           ("refuse-fine-tune-without-book-price", "chat", "ft:gpt-4.1-2025-04-14:acme::abc"),
           ("refuse-house-unpriced", "house", "house-other-1")]
# With [metering] unpriced = "allow" (and an old-format pricing.csv): served under acme's usd limit.
ALLOWED = [
    unpriced("allow-unpriced-openai", "chat", "gpt-unknown-9", who="alice"),
    unpriced("allow-unpriced-anthropic", "messages", "claude-unknown-9", who="alice"),
    unpriced("allow-unpriced-gemini", "gemini", "gemini-unknown-9", who="alice"),
    unpriced("allow-fine-tune-without-book-price", "chat", "ft:gpt-4.1-2025-04-14:acme::abc", who="alice"),
    Case("old-format-override-gpt-4o-mini", "chat", "gpt-4o-mini", Sim(1000, 200, cached=400), MINI_OVERRIDE,
         "gpt-4o-mini", OVERRIDE),
    Case("old-format-override-fine-tune-glob", "chat", "ft:gpt-4o-mini-2024-07-18:acme::abc123",
         Sim(1000, 200, cached=100), FT_OVERRIDE, ("ft:gpt-4o-mini-2024-07-18:acme::abc123", FT_GLOB), OVERRIDE),
]


# --- running a group through one gateway ----------------------------------------------------------
def send(http: httpx.Client, gw: GatewayProcess, api: str, model: str, who: str, stream: bool, tag: str,
         headers: dict | None = None, extra: dict | None = None) -> httpx.Response:
    token = gw.deployment.tokens[who]
    prompt = "Please price this request exactly."
    headers = {TAG: tag, **(headers or {})}
    body: dict = {"model": model, **(extra or {})}
    if api in ("chat", "house"):
        path = ("/openai" if api == "chat" else "/house") + "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
        headers["authorization"] = f"Bearer {token}"
    elif api == "responses":
        path, body["input"] = "/openai/v1/responses", prompt
        headers["authorization"] = f"Bearer {token}"
    elif api == "messages":
        path = "/anthropic/v1/messages"
        body.update(max_tokens=4096, messages=[{"role": "user", "content": prompt}])
        headers.update({"x-api-key": token, "anthropic-version": "2023-06-01"})
    else:
        del body["model"]
        path = f"/gemini/v1beta/models/{model}:" + ("streamGenerateContent?alt=sse" if stream else "generateContent")
        body["contents"] = [{"role": "user", "parts": [{"text": prompt}]}]
        headers["x-goog-api-key"] = token
    if stream and api != "gemini":
        body["stream"] = True
    return http.post(gw.url + path, json=body, headers=headers)


def tag_of(case_id: str, stream: bool) -> str:
    return f"{case_id}/{'stream' if stream else 'json'}"


@dataclass
class Run:
    responses: dict[str, httpx.Response]
    events: dict[str, dict]
    reached: set[str]  # tags of the requests the simulator received
    sdk_errors: dict[str, Exception | None] = field(default_factory=dict)

    def event(self, response: httpx.Response) -> dict:
        return self.events[response.headers[REQUEST_ID]]


def deployment(root, simulator, pricing: str, toml: str = "") -> Deployment:
    dep = Deployment(root, simulator.url)
    dep.write_toml(toml, providers={"house": simulator.url + "/openai"})  # a custom OpenAI-style provider
    dep.add_test_keys()
    dep.add_key("house-key", "house", SIM_KEYS["openai"])
    policy = dep.path / "policy"
    (policy / "access.csv").write_text("p, *, *, *, allow\n")
    (policy / "routes.csv").write_text(ROUTES + "p, *, house/*, house-key\n")
    (policy / "limits.csv").write_text("tenant,subject,metric,window,limit\nacme,tenant,usd,month,5000\n")
    (dep.path / "pricing.csv").write_text(pricing)
    dep.issue_token("alice", "acme", "alice@acme.com")
    dep.issue_token("carol", "globex", "carol@globex.com")
    return dep


def run_group(dep: Deployment, simulator, cases: list[Case], refused=(), extra=None) -> Run:
    gw = GatewayProcess(dep).start()
    responses: dict[str, httpx.Response] = {}
    sdk_errors: dict = {}
    try:
        with httpx.Client(timeout=30) as http:
            for case in cases:
                for stream in (False, True):
                    tag = tag_of(case.id, stream)
                    responses[tag] = send(http, gw, case.api, case.model, case.who, stream, tag,
                                          case.sim.headers(), case.body)
            for case_id, api, model in refused:
                for stream in (False, True):
                    tag = tag_of(case_id, stream)
                    responses[tag] = send(http, gw, api, model, "alice", stream, tag)
        if extra:
            sdk_errors = extra(gw)
    finally:
        gw.stop()
    events = {str(e["event_id"]): e for e in dep.events()}
    reached = {r.headers.get(TAG) for r in simulator.requests}
    return Run(responses, events, reached, sdk_errors)


def sdk_refusals(gw: GatewayProcess) -> dict[str, Exception | None]:
    """The official SDKs asking for an unpriced model under a usd limit: each must raise its 403."""
    token, found = gw.deployment.tokens["alice"], {}
    messages = [{"role": "user", "content": "hi"}]
    gemini = genai.Client(api_key=token, http_options=genai_types.HttpOptions(  # held: it closes when collected
        base_url=gw.url + "/gemini", api_version="v1beta", headers={TAG: "sdk-gemini"}))
    attempts = {
        "openai": lambda: openai.OpenAI(base_url=gw.url + "/openai/v1", api_key=token, max_retries=0)
        .chat.completions.create(model="gpt-unknown-9", messages=messages, extra_headers={TAG: "sdk-openai"}),
        "anthropic": lambda: anthropic.Anthropic(base_url=gw.url + "/anthropic", api_key=token, max_retries=0)
        .messages.create(model="claude-unknown-9", max_tokens=64, messages=messages,
                         extra_headers={TAG: "sdk-anthropic"}),
        "gemini": lambda: gemini.models.generate_content(model="gemini-unknown-9", contents="hi"),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            found[name] = None
        except Exception as exc:  # noqa: BLE001 - the test asserts on the type
            found[name] = exc
    return found


@pytest.fixture(scope="module")
def refusing(tmp_path_factory, simulator) -> Run:
    dep = deployment(tmp_path_factory.mktemp("metering-refuse") / "deploy", simulator, PRICING_EXTENDED)
    return run_group(dep, simulator, CASES, REFUSED, sdk_refusals)


@pytest.fixture(scope="module")
def allowing(tmp_path_factory, simulator) -> Run:
    dep = deployment(tmp_path_factory.mktemp("metering-allow") / "deploy", simulator, PRICING_OLD_FORMAT,
                     toml='[metering]\nunpriced = "allow"\n')
    return run_group(dep, simulator, ALLOWED)


# --- the checks -----------------------------------------------------------------------------------
def check_served(run: Run, case: Case, stream: bool) -> None:
    response = run.responses[tag_of(case.id, stream)]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream" if stream else "application/json")
    event = run.event(response)
    expected_cost = case.expected_cost(event["ts"].astimezone(UTC).date())
    priced = event["priced_model"]
    want_priced = priced if isinstance(case.priced, tuple) and priced in case.priced else case.priced
    got = {name: event[name] or 0 for name in case.columns()}
    got.update({k: event[k] for k in ("outcome", "status_code", "streamed", "provider", "model", "usage_source",
                                      "service_tier", "priced_model", "price_source", "cost_usd")})
    want = {**case.columns(), "outcome": "ok", "status_code": 200, "streamed": stream, "provider": case.provider,
            "model": f"{case.provider}/{case.model}", "usage_source": "reported", "service_tier": case.tier(),
            "priced_model": want_priced, "price_source": case.source, "cost_usd": expected_cost}
    if not stream:  # (12) a JSON response says what it cost: the event's exact figure, absent when unpriced
        got["cost_header"] = response.headers.get(COST)
        want["cost_header"] = None if expected_cost is None else str(expected_cost)
    assert got == want
    if not stream and expected_cost is not None:
        header = response.headers[COST]
        assert re.fullmatch(r"\d+\.\d{9}", header) and header == str(event["cost_usd"])
    assert tag_of(case.id, stream) in run.reached


def ids(cases) -> list:
    return [pytest.param(c, s, id=tag_of(c.id, s)) for c in cases for s in (False, True)]


@pytest.mark.parametrize(("case", "stream"), ids(CASES))
def test_metered_through_the_gateway(refusing, case, stream):
    check_served(refusing, case, stream)


@pytest.mark.parametrize(("case", "stream"), ids(ALLOWED))
def test_unpriced_allowed_and_old_format_overrides(allowing, case, stream):
    check_served(allowing, case, stream)


def error_of(api: str, body: dict) -> tuple[str, str]:
    """(the provider-format marker of a model_unpriced refusal, its message)."""
    error = body["error"]
    if api == "messages":
        assert body["type"] == "error"
        return error["type"], error["message"]
    if api == "gemini":
        reasons = [d.get("reason") for d in error.get("details") or ()]
        return f"{error['code']} {error['status']} {reasons}", error["message"]
    return error["code"], error["message"]


MARKERS = {"chat": "model_unpriced", "responses": "model_unpriced", "house": "model_unpriced",
           "messages": "permission_error", "gemini": "403 PERMISSION_DENIED ['MODEL_UNPRICED']"}


@pytest.mark.parametrize(("case_id", "api", "model", "stream"),
                         [pytest.param(*r, s, id=tag_of(r[0], s)) for r in REFUSED for s in (False, True)])
def test_unpriced_under_a_usd_limit_is_refused_before_the_provider(refusing, case_id, api, model, stream):
    response = refusing.responses[tag_of(case_id, stream)]
    assert response.status_code == 403, response.text
    marker, message = error_of(api, response.json())
    assert marker == MARKERS[api]
    assert model in message and "pricing.csv" in message
    assert COST not in response.headers
    assert tag_of(case_id, stream) not in refusing.reached, "an unpriced request reached the provider"
    event = refusing.event(response)
    provider = "openai" if api in ("chat", "responses") else {"messages": "anthropic"}.get(api, api)
    assert (event["outcome"], event["status_code"], event["model"], event["streamed"]) == (
        "denied", 403, f"{provider}/{model}", stream)
    assert (event["cost_usd"], event["priced_model"], event["input_tokens"], event["key_id"]) == (None,) * 4


def test_the_official_sdks_see_the_refusal_in_their_own_error_types(refusing):
    errors = refusing.sdk_errors
    assert isinstance(errors["openai"], openai.PermissionDeniedError), errors["openai"]
    assert errors["openai"].code == "model_unpriced" and "gpt-unknown-9" in errors["openai"].message
    assert isinstance(errors["anthropic"], anthropic.PermissionDeniedError), errors["anthropic"]
    assert "claude-unknown-9" in errors["anthropic"].message
    assert isinstance(errors["gemini"], genai_errors.ClientError), errors["gemini"]
    assert (errors["gemini"].code, errors["gemini"].status) == (403, "PERMISSION_DENIED")
    assert not {"sdk-openai", "sdk-anthropic", "sdk-gemini"} & refusing.reached
