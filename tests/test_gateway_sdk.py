"""End to end: official SDKs → a real `tollway serve` → the simulated providers, then the events."""

from __future__ import annotations

from decimal import Decimal

import pytest
from google import genai
from google.genai import types

from tests.helpers import SIM_KEYS

pytestmark = pytest.mark.timeout(90)


def _price(input_tokens, output_tokens, in_per_mtok, out_per_mtok, cached=0, cached_per_mtok=0):
    fresh = input_tokens - cached
    return ((Decimal(fresh) * Decimal(in_per_mtok) + Decimal(cached) * Decimal(cached_per_mtok)
             + Decimal(output_tokens) * Decimal(out_per_mtok)) / Decimal(1_000_000)).quantize(Decimal("1e-9"))


def test_openai_chat_non_streaming_is_answered_and_priced(gateway, sim, openai_for):
    reply = openai_for("bob").chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello to the gateway please"}])
    assert reply.choices[0].message.content.startswith("This is a simulated reply from gpt-4o-mini")
    seen = sim.requests[-1]
    assert seen.headers["authorization"] == f"Bearer {SIM_KEYS['openai']}"
    assert gateway.stop() == 0

    [event] = gateway.deployment.events()
    assert event["outcome"] == "ok" and event["status_code"] == 200
    assert (event["provider"], event["model"], event["endpoint"]) == ("openai", "openai/gpt-4o-mini", "openai/chat.completions.create")
    assert (event["input_tokens"], event["output_tokens"]) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert event["usage_source"] == "reported"
    assert event["cost_usd"] == _price(reply.usage.prompt_tokens, reply.usage.completion_tokens, "0.15", "0.60")
    assert (event["tenant"], event["auth_method"], event["key_id"], event["billing_mode"]) == (
        "acme", "token", "operator-openai", "unified")
    assert event["streamed"] is False and event["latency_ms"] > 0 and event["upstream_ms"] > 0


def test_openai_stream_without_include_usage_gets_no_extra_chunk_but_is_metered(gateway, sim, openai_for):
    stream = openai_for("bob").chat.completions.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "stream to me"}],
        extra_headers={"x-sim-chunks": "6"})
    chunks = list(stream)
    assert all(chunk.choices for chunk in chunks), "the injected usage-only chunk must be held back"
    assert all(chunk.usage is None for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("This is a simulated reply")
    assert sim.requests[-1].body["stream_options"] == {"include_usage": True}
    gateway.stop()

    [event] = gateway.deployment.events()
    assert event["streamed"] is True and event["usage_source"] == "reported"
    assert event["output_tokens"] == len(text.split()) and event["ttfb_ms"] is not None


def test_openai_stream_with_include_usage_keeps_the_usage_chunk(gateway, openai_for):
    stream = openai_for("bob").chat.completions.create(
        model="gpt-4o-mini", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "count me"}])
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    usage = chunks[-1].usage
    gateway.stop()
    [event] = gateway.deployment.events()
    assert (event["input_tokens"], event["output_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)


def test_cached_and_reasoning_tokens_are_metered_at_their_prices(gateway, openai_for):
    reply = openai_for("bob").chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 400}],
        extra_headers={"x-sim-cached-tokens": "64", "x-sim-reasoning-tokens": "5"})
    usage = reply.usage
    assert usage.prompt_tokens_details.cached_tokens == 64
    gateway.stop()
    [event] = gateway.deployment.events()
    assert event["cached_input_tokens"] == 64 and event["reasoning_tokens"] == 5
    assert event["cost_usd"] == _price(usage.prompt_tokens, usage.completion_tokens, "0.15", "0.60",
                                       cached=64, cached_per_mtok="0.075")


def test_openai_responses_and_embeddings(gateway, openai_for):
    client = openai_for("carol")  # globex may use every openai model
    response = client.responses.create(model="gpt-4.1-mini", input="Hello responses")
    assert response.output_text
    events = list(client.responses.create(model="gpt-4.1-mini", input="stream it", stream=True))
    assert events[-1].type == "response.completed"
    embedding = client.embeddings.create(model="text-embedding-3-small", input="embed me")
    assert embedding.data[0].embedding
    gateway.stop()

    rows = gateway.deployment.events()
    assert [(r["endpoint"], r["streamed"], r["usage_source"]) for r in rows] == [
        ("openai/responses.create", False, "reported"), ("openai/responses.create", True, "reported"),
        ("openai/embeddings.create", False, "reported")]
    assert rows[0]["input_tokens"] == response.usage.input_tokens
    assert rows[1]["output_tokens"] == events[-1].response.usage.output_tokens
    assert rows[2]["output_tokens"] == 0 and rows[2]["cost_usd"] is not None


def test_anthropic_messages_byok_with_cache_tokens(gateway, sim, anthropic_for):
    client = anthropic_for("alice")
    message = client.messages.create(
        model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "Hi Claude"}],
        extra_headers={"x-sim-cached-tokens": "100", "x-sim-cache-write-tokens": "50"})
    assert message.content[0].text.startswith("This is a simulated reply")
    seen = sim.requests[-1]
    assert seen.headers["x-api-key"] == SIM_KEYS["anthropic"] and "authorization" not in seen.headers
    gateway.stop()

    [event] = gateway.deployment.events()
    usage = message.usage
    total_in = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    assert (event["input_tokens"], event["cached_input_tokens"], event["cache_write_tokens"]) == (total_in, 100, 50)
    assert (event["key_id"], event["billing_mode"]) == ("acme-anthropic", "byok")
    expected = (Decimal(usage.input_tokens) * 3 + Decimal(100) * Decimal("0.30") + Decimal(50) * Decimal("3.75")
                + Decimal(usage.output_tokens) * 15) / 1_000_000
    assert event["cost_usd"] == expected.quantize(Decimal("1e-9"))


def test_anthropic_stream_usage_from_message_start_and_delta(gateway, anthropic_for):
    with anthropic_for("alice").messages.stream(
            model="claude-haiku-4-5", max_tokens=9, messages=[{"role": "user", "content": "stream please"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.usage.output_tokens == 9
    gateway.stop()
    [event] = gateway.deployment.events()
    assert event["streamed"] is True
    assert (event["input_tokens"], event["output_tokens"]) == (final.usage.input_tokens, 9)


def test_gemini_generate_and_stream_with_google_genai(gateway, sim):
    client = genai.Client(api_key=gateway.deployment.tokens["carol"], http_options=types.HttpOptions(
        base_url=gateway.url + "/gemini", api_version="v1beta"))
    reply = client.models.generate_content(model="gemini-2.5-flash", contents="Hello Gemini")
    assert reply.text.startswith("This is a simulated reply")
    assert sim.requests[-1].headers["x-goog-api-key"] == SIM_KEYS["gemini"]
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="Stream Gemini"))
    final_usage = chunks[-1].usage_metadata
    gateway.stop()

    rows = gateway.deployment.events()
    assert [(r["model"], r["endpoint"], r["streamed"]) for r in rows] == [
        ("gemini/gemini-2.5-flash", "gemini/generate_content", False),
        ("gemini/gemini-2.5-flash", "gemini/generate_content_stream", True)]
    assert rows[0]["input_tokens"] == reply.usage_metadata.prompt_token_count
    assert rows[1]["output_tokens"] == final_usage.candidates_token_count
    assert all(r["billing_mode"] == "unified" and r["cost_usd"] > 0 for r in rows)


def test_provider_sees_only_the_injected_key_never_the_client_token(gateway, sim, openai_for, anthropic_for):
    openai_for("bob").chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}])
    anthropic_for("alice").messages.create(model="claude-sonnet-4-5", max_tokens=5,
                                           messages=[{"role": "user", "content": "b"}])
    tokens = list(gateway.deployment.tokens.values())
    for request in sim.requests:
        dumped = repr(request.headers) + repr(request.body) + request.query
        assert not any(token in dumped for token in tokens)
        assert "x-forwarded-for" not in request.headers and "cf-access-jwt-assertion" not in request.headers


def test_events_are_anonymised_and_one_per_request(gateway, openai_for, anthropic_for):
    prompt = "my secret prompt about project zebra"
    openai_for("bob").chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
    openai_for("bob").chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
    anthropic_for("alice").messages.create(model="claude-sonnet-4-5", max_tokens=5,
                                           messages=[{"role": "user", "content": prompt}])
    gateway.stop()

    rows = gateway.deployment.events()
    assert len(rows) == 3
    assert rows[0]["user_pseudonym"] == rows[1]["user_pseudonym"] != rows[2]["user_pseudonym"]
    raw = (gateway.deployment.path / "events.duckdb").read_bytes()
    secrets = [*gateway.deployment.tokens.values(), *SIM_KEYS.values(), "bob@acme.com", "alice@acme.com",
               "project zebra", "127.0.0.1", "simulated reply"]
    for secret in secrets:
        assert secret.encode() not in raw, f"{secret!r} leaked into events.duckdb"
    for row in rows:
        assert not any(secret in str(value) for value in row.values() for secret in secrets)
