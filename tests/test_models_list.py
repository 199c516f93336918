"""`GET /{provider}/v1/models` lists only the models the caller may use, through the official SDKs.

The simulated providers list: OpenAI gpt-4o, gpt-4o-mini, o3-mini, text-embedding-3-small;
Anthropic claude-sonnet-4-6, claude-opus-4-6, claude-haiku-4-5; Gemini gemini-2.5-flash,
gemini-2.5-pro, gemini-embedding-001. The policy is the sample from `tollway init`.
"""

from __future__ import annotations

import time

import anthropic
import httpx
import openai
import pytest

from tests.helpers import SIM_KEYS, run_cli

pytestmark = pytest.mark.timeout(60)

ALL_OPENAI = ["gpt-4o", "gpt-4o-mini", "o3-mini", "text-embedding-3-small"]
ALL_CLAUDE = ["claude-sonnet-4-6", "claude-opus-4-6", "claude-haiku-4-5"]
ALL_GEMINI = ["gemini-2.5-flash", "gemini-2.5-pro", "gemini-embedding-001"]


def book_ids(provider_id: str) -> list[str]:
    """The model ids the pinned price book (genai-prices' own data) has for a provider."""
    from genai_prices import data_snapshot
    provider = next(p for p in data_snapshot.get_snapshot().providers if p.id == provider_id)
    return sorted(m.id for m in provider.models)


def gemini_models(gateway, token_name: str) -> httpx.Response:
    return httpx.get(gateway.url + "/gemini/v1beta/models", timeout=10,
                     headers={"x-goog-api-key": gateway.deployment.tokens[token_name]})


def test_openai_models_list_is_filtered_by_policy(gateway, sim, openai_for):
    assert [m.id for m in openai_for("bob").models.list()] == ["gpt-4o-mini"]  # acme: only gpt-4o-mini
    assert sim.requests[-1].headers["authorization"] == f"Bearer {SIM_KEYS['openai']}"  # the provider's own list
    assert [m.id for m in openai_for("carol").models.list()] == ALL_OPENAI  # globex: openai/*
    page = openai_for("carol").models.list()
    assert all(m.object == "model" and m.owned_by == "system" for m in page)  # the provider's entries, as they were


def test_anthropic_models_list_is_filtered_by_policy(gateway, anthropic_for):
    assert [m.id for m in anthropic_for("bob").models.list()] == []  # no Claude for bob
    assert [m.id for m in anthropic_for("alice").models.list()] == ALL_CLAUDE  # role:engineering
    # dana is an engineer and a contractor: no claude-opus-*
    assert [m.id for m in anthropic_for("dana").models.list()] == ["claude-sonnet-4-6", "claude-haiku-4-5"]
    assert [m.id for m in anthropic_for("carol").models.list()] == []


def test_gemini_models_list_is_filtered_by_policy(gateway):
    carol = gemini_models(gateway, "carol")
    assert carol.status_code == 200
    assert [m["name"] for m in carol.json()["models"]] == [f"models/{m}" for m in ALL_GEMINI]
    bob = gemini_models(gateway, "bob")
    assert (bob.status_code, bob.json()["models"]) == (200, [])


def test_without_a_usable_key_the_list_comes_from_pricing_filtered_by_policy(gateway, sim, openai_for):
    assert run_cli(gateway.deployment.path, "keys", "revoke", "operator-gemini").returncode == 0
    sim.clear()
    carol = gemini_models(gateway, "carol")
    assert carol.status_code == 200
    listed = [m["name"] for m in carol.json()["models"]]
    assert listed == [f"models/{m}" for m in book_ids("google")]  # globex may use every gemini model
    assert {"models/gemini-2.5-flash", "models/gemini-2.5-pro", "models/gemini-embedding-001"} <= set(listed)
    assert gemini_models(gateway, "bob").json()["models"] == []
    assert sim.requests == []  # nothing was asked upstream

    assert run_cli(gateway.deployment.path, "keys", "revoke", "operator-openai").returncode == 0
    priced_openai = [m.id for m in openai_for("carol").models.list()]
    assert priced_openai == book_ids("openai")
    assert {"gpt-4.1", "gpt-4o", "gpt-4o-mini", "gpt-5", "o3", "text-embedding-3-small"} <= set(priced_openai)
    assert [m.id for m in openai_for("bob").models.list()] == ["gpt-4o-mini"]
    assert sim.requests == []


def test_retrieving_a_denied_model_is_403(gateway, openai_for, anthropic_for):
    with pytest.raises(openai.PermissionDeniedError) as denied:
        openai_for("bob").models.retrieve("gpt-4o")
    assert "Tenant 'acme' may not use model 'openai/gpt-4o'" in denied.value.message
    raw = httpx.get(gateway.url + "/openai/v1/models/gpt-4o", timeout=10,
                    headers={"authorization": f"Bearer {gateway.deployment.tokens['bob']}"})
    assert raw.status_code == 403
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic_for("bob").models.retrieve("claude-opus-4-6")


def test_models_list_requires_a_valid_credential(gateway):
    response = httpx.get(gateway.url + "/openai/v1/models", timeout=10, headers={"authorization": "Bearer tw_bogus"})
    assert response.status_code == 401
    assert httpx.get(gateway.url + "/anthropic/v1/models", timeout=10).status_code == 401


def test_policy_reload_changes_the_list(gateway, openai_for):
    access = gateway.deployment.path / "policy/access.csv"
    access.write_text(access.read_text() + "p, bob@acme.com, acme, openai/o3-*, allow\n")
    deadline = time.monotonic() + 5
    while [m.id for m in openai_for("bob").models.list()] != ["gpt-4o-mini", "o3-mini"]:
        assert time.monotonic() < deadline, "the new rule did not reach the model list within 5 s"
        time.sleep(0.1)
