"""What coding agents do on start-up and on every call, through a real `tollway serve`.

Claude Code checks its base URL with a `HEAD` before the first call, and may send a fresh
`Authorization: Bearer` beside a stale `x-api-key`: the Bearer must win. `count_tokens` is governed
by the model like any call, and never billed.
"""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.helpers import SIM_KEYS

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("path", ["/anthropic", "/anthropic/", "/openai", "/gemini/"])
def test_head_and_get_on_a_providers_base_url_answer_200_without_a_credential_or_an_event(gateway, sim, path):
    with httpx.Client(base_url=gateway.url, timeout=5) as http:
        head = http.head(path)
        got = http.get(path)
        post = http.post(path, json={})
        metrics = http.get("/metrics").text
    assert head.status_code == 200 and head.content == b""
    assert got.status_code == 200 and got.json() == {"gateway": "tollway"}
    assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
    assert sim.requests == []
    assert "tollway_requests_total{" not in metrics, "a base-URL check is not a request to meter"
    assert gateway.stop() == 0
    assert gateway.deployment.events() == []


def test_a_fresh_bearer_wins_over_a_stale_x_api_key(gateway, sim):
    fresh = gateway.deployment.tokens["alice"]
    client = anthropic.Anthropic(base_url=gateway.url + "/anthropic", api_key="tw_stale_revoked_long_ago",
                                 default_headers={"authorization": f"Bearer {fresh}"}, max_retries=0)
    reply = client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert reply.content[0].text
    [seen] = sim.requests
    assert seen.headers["x-api-key"] == SIM_KEYS["anthropic"] and "authorization" not in seen.headers


def test_count_tokens_is_governed_by_the_model_and_not_billed(gateway, sim):
    alice = anthropic.Anthropic(base_url=gateway.url + "/anthropic", api_key=gateway.deployment.tokens["alice"],
                                max_retries=0)
    bob = anthropic.Anthropic(base_url=gateway.url + "/anthropic", api_key=gateway.deployment.tokens["bob"],
                              max_retries=0)
    messages = [{"role": "user", "content": "count these words please"}]
    counted = alice.messages.count_tokens(model="claude-sonnet-4-5", messages=messages)
    assert counted.input_tokens > 0
    with pytest.raises(anthropic.PermissionDeniedError):  # bob has no engineering role: no Claude at all
        bob.messages.count_tokens(model="claude-sonnet-4-5", messages=messages)
    assert gateway.stop() == 0
    rows = {row["outcome"]: row for row in gateway.deployment.events()}
    assert rows["ok"]["endpoint"] == "anthropic/messages.count_tokens"
    assert rows["ok"]["cost_usd"] is None and rows["ok"]["usage_source"] == "none"
    assert rows["denied"]["model"] == "anthropic/claude-sonnet-4-5"
    assert rows["denied"]["endpoint"] == "anthropic/messages.count_tokens"
