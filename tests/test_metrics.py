"""`GET /metrics` of a real `tollway serve`: Prometheus text whose counters agree with events.duckdb,
with latency histograms, limit refusals, key failures and the event queue, and no user identity."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter, defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import SIM_KEYS, GatewayProcess
from tests.perf.loadgen import build_request, run_load

pytestmark = pytest.mark.timeout(60)

ROUTES = """p, acme, anthropic/*, acme-anthropic
p, *, openai/*, operator-openai
p, *, gemini/*, bad-gemini|operator-gemini
"""
LIMITS = "tenant,subject,metric,window,limit\nacme,bob@acme.com,requests,hour,4\n"


def _samples(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Every sample by its name, parsed the way Prometheus parses it."""
    out: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((sample.labels, sample.value))
    return out


def _value(samples, name: str, **labels: str) -> float:
    return sum(v for found, v in samples.get(name, []) if all(found.get(k) == w for k, w in labels.items()))


@pytest.fixture
def traffic(deployment, sim):
    """A gateway that served ok, refused, failed-over, streamed and unauthenticated requests; its /metrics."""
    deployment.add_key("bad-gemini", "gemini", "gm-wrong-secret")
    (deployment.path / "policy" / "routes.csv").write_text(ROUTES)
    (deployment.path / "policy" / "limits.csv").write_text(LIMITS)
    gw = GatewayProcess(deployment).start()
    tokens = deployment.tokens
    chat = {"model": "gpt-4o-mini", "max_tokens": 32, "messages": [{"role": "user", "content": "metrics please"}]}
    with httpx.Client(timeout=10) as http, contextlib.ExitStack() as stopped:
        stopped.callback(gw.stop)  # also when an assertion below fails
        bob = {"authorization": f"Bearer {tokens['bob']}"}
        for _ in range(3):
            assert http.post(gw.url + "/openai/v1/chat/completions", json=chat, headers=bob).status_code == 200
        streamed = http.post(gw.url + "/openai/v1/chat/completions", json={**chat, "stream": True}, headers=bob)
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        refused = http.post(gw.url + "/openai/v1/chat/completions", json=chat, headers=bob)
        assert refused.status_code == 429
        claude = {"model": "claude-sonnet-4-5", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
        assert http.post(gw.url + "/anthropic/v1/messages", json=claude,
                         headers={"x-api-key": tokens["alice"]}).status_code == 200
        gemini = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
        for _ in range(2):
            assert http.post(gw.url + "/gemini/v1beta/models/gemini-2.5-flash:generateContent", json=gemini,
                             headers={"x-goog-api-key": tokens["carol"]}).status_code == 200
        assert http.post(gw.url + "/openai/v1/chat/completions", json=chat,
                         headers={"authorization": "Bearer tw_not-a-token"}).status_code == 401
        assert http.post(gw.url + "/openai/v1/chat/completions", json={**chat, "model": "gpt-4o"},
                         headers=bob).status_code == 403  # bob may not use gpt-4o
        assert http.post(gw.url + "/nosuch/v1/chat/completions", json=chat, headers=bob).status_code == 404
        response = http.get(gw.url + "/metrics")
    assert gw.stop() == 0, gw.log()
    return response, deployment.events()


def test_metrics_is_prometheus_text(traffic):
    response, _ = traffic
    assert response.status_code == 200
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
    expected = {"tollway_requests": "counter", "tollway_tokens": "counter", "tollway_cost_usd": "counter",
                "tollway_request_duration_seconds": "histogram", "tollway_time_to_first_byte_seconds": "histogram",
                "tollway_limit_refusals": "counter", "tollway_key_failures": "counter",
                "tollway_event_queue_depth": "gauge"}
    for name, kind in expected.items():
        assert families.get(name) == kind, (name, families)
    media_type, *params = [part.strip() for part in response.headers["content-type"].split(";")]
    values: dict[str, set[str]] = defaultdict(set)
    for param in params:
        name, _, value = param.partition("=")
        values[name.lower()].add(value.strip('"').lower())
    assert media_type == "text/plain" and "version" in values, response.headers["content-type"]
    # Prometheus reads the header with Go's mime.ParseMediaType, which refuses one parameter with two values
    assert all(len(v) == 1 for v in values.values()), response.headers["content-type"]


#: The only model the sample policy names exactly; the others are labelled as the price book's id they were
#: billed as, or `other`.
NAMED_MODELS = {"openai/gpt-4o-mini"}


def _model_label(event: dict) -> str:
    if event["model"] is None:
        return "-"
    if event["model"] in NAMED_MODELS:
        return event["model"]
    if event["price_source"] == "genai-prices 0.2.5":
        return f"{event['provider']}/{event['priced_model']}"
    return "other"


def _requests_total(samples) -> dict[tuple, float]:
    return {(s["tenant"], s["provider"], s["model"], s["outcome"]): v for s, v in samples["tollway_requests_total"]}


def test_requests_tokens_and_cost_by_tenant_provider_model_outcome(traffic):
    response, events = traffic
    samples = _samples(response.text)
    counted = _requests_total(samples)
    assert counted[("acme", "openai", "openai/gpt-4o-mini", "ok")] == 4.0
    assert counted[("acme", "openai", "openai/gpt-4o-mini", "rate_limited")] == 1.0
    # a model the policy does not name exactly, never billed from the price book: `other` (clients cannot add series)
    assert counted[("acme", "openai", "other", "denied")] == 1.0
    assert counted[("acme", "anthropic", "anthropic/claude-sonnet-4-5", "ok")] == 1.0
    assert counted[("globex", "gemini", "gemini/gemini-2.5-flash", "ok")] == 2.0
    assert counted[("-", "openai", "-", "unauthenticated")] == 1.0

    for tenant, provider, model in {(e["tenant"], e["provider"], _model_label(e)) for e in events if e["input_tokens"]}:
        mine = [e for e in events if (e["tenant"], e["provider"], _model_label(e)) == (tenant, provider, model)]
        labels = {"tenant": tenant, "provider": provider, "model": model}
        assert _value(samples, "tollway_tokens_total", direction="input", **labels) == sum(
            e["input_tokens"] or 0 for e in mine)
        assert _value(samples, "tollway_tokens_total", direction="output", **labels) == sum(
            e["output_tokens"] or 0 for e in mine)
        cost = float(sum(e["cost_usd"] or 0 for e in mine))
        assert _value(samples, "tollway_cost_usd_total", **labels) == pytest.approx(cost, rel=1e-9)
    assert _value(samples, "tollway_cost_usd_total", tenant="acme", billing_mode="byok") > 0  # acme's own Anthropic key
    assert _value(samples, "tollway_cost_usd_total", tenant="acme", billing_mode="unified") > 0


def test_latency_histograms(traffic):
    response, events = traffic
    samples = _samples(response.text)
    for provider in ("openai", "anthropic", "gemini"):
        buckets = sorted(((float(s["le"]), v) for s, v in samples["tollway_request_duration_seconds_bucket"]
                          if s["provider"] == provider), key=lambda b: b[0])
        assert buckets[-1][0] == float("inf")
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), "histogram buckets are cumulative"
        recorded = [e for e in events if e["provider"] == provider and e["latency_ms"] is not None]
        assert _value(samples, "tollway_request_duration_seconds_count", provider=provider) == len(recorded) == counts[-1]
        assert _value(samples, "tollway_request_duration_seconds_sum", provider=provider) == pytest.approx(
            sum(e["latency_ms"] for e in recorded) / 1000, rel=1e-6)
    assert _value(samples, "tollway_time_to_first_byte_seconds_count", provider="openai") >= 4


def test_limit_refusals_key_failures_and_queue_depth(traffic):
    response, events = traffic
    samples = _samples(response.text)
    assert samples["tollway_limit_refusals_total"] == [({"tenant": "acme", "metric": "requests", "window": "hour"}, 1.0)]
    # two 401s are not yet three in a row: the refused key stays in the pool, tried first each time
    assert samples["tollway_key_failures_total"] == [({"key_id": "bad-gemini", "reason": "401"}, 2.0)]
    gemini = [e for e in events if e["provider"] == "gemini" and e["outcome"] == "ok"]
    assert [(e["key_id"], e["attempts"]) for e in gemini] == [("operator-gemini", 2), ("operator-gemini", 2)]
    [(labels, depth)] = samples["tollway_event_queue_depth"]
    assert labels == {} and 0 <= depth <= len(events)


def test_no_user_identity_token_or_key_in_metrics(traffic):
    response, events = traffic
    text = response.text
    for secret in ("alice", "bob", "carol", "@acme.com", "@globex.com", "tw_", *SIM_KEYS.values(), "gm-wrong-secret"):
        assert secret not in text, f"{secret!r} appears in /metrics"
    for pseudonym in {e["user_pseudonym"] for e in events if e["user_pseudonym"]}:
        assert str(pseudonym) not in text and isinstance(pseudonym, uuid.UUID)
    label_names = {name for family in text_string_to_metric_families(text) for s in family.samples for name in s.labels}
    assert label_names <= {"tenant", "provider", "model", "outcome", "direction", "billing_mode", "le", "metric",
                           "window", "key_id", "reason", "threshold", "line", "hash"}, label_names


def test_every_request_that_left_an_event_is_counted_once_by_outcome(traffic):
    response, events = traffic
    by_labels = Counter((e["tenant"] or "-", e["provider"] or "-", _model_label(e), e["outcome"]) for e in events)
    counted = _requests_total(_samples(response.text))
    missing = {k: v for k, v in by_labels.items() if counted.get(k) != float(v)}
    assert not missing, f"in events.duckdb but not (or not as often) in tollway_requests_total: {missing}"
    assert counted == {k: float(v) for k, v in by_labels.items()}


def test_twenty_thousand_invented_model_names_add_no_series(deployment, sim):
    """Clients choose model names (and, through JWT claims, tenants): none of it may grow /metrics."""
    gw = GatewayProcess(deployment).start()

    def invented(who: str):
        token = deployment.tokens[who]
        return lambda i: build_request("127.0.0.1", deployment.port, "/openai/v1/chat/completions", json.dumps(
            {"model": f"gpt-invented-{i}", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}).encode(),
            {"Authorization": f"Bearer {token}"})

    try:
        baseline = httpx.get(gw.url + "/metrics", timeout=10).text
        # bob may not use them (denied); carol's tenant allows openai/* (served by the simulator, unpriced)
        denied = asyncio.run(run_load("127.0.0.1", deployment.port, invented("bob"), concurrency=16,
                                      requests=20_000, max_seconds=90))
        served = asyncio.run(run_load("127.0.0.1", deployment.port, invented("carol"), concurrency=16,
                                      requests=200, max_seconds=30))
        after = httpx.get(gw.url + "/metrics", timeout=10).text
    finally:
        assert gw.stop() == 0, gw.log()
    assert (denied.statuses, served.statuses) == ({403: 20_000}, {200: 200})
    assert "gpt-invented" not in after
    requests = _requests_total(_samples(after))
    assert requests[("acme", "openai", "other", "denied")] == 20_000.0
    assert requests[("globex", "openai", "other", "ok")] == 200.0
    assert len(after) < len(baseline) + 20_000, "a handful of series, not one per name"
