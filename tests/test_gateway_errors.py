"""Refusals and failures through a real `tollway serve`: the spec's status code, in the error format of
the provider route the client used, an `x-tollway-request-id` on every response, and exactly one event
per request (its `event_id` is that request id) with the right outcome and status code.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from tests.helpers import SIM_KEYS, GatewayProcess, free_port, run_cli

pytestmark = pytest.mark.timeout(60)

REQUEST_ID = "x-tollway-request-id"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
MESSAGES = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}
GENERATE = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
GEMINI_PATH = "/gemini/v1beta/models/gemini-2.5-flash:generateContent"


# --- clients and shapes --------------------------------------------------------------------------
def _openai(gw: GatewayProcess, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/openai/v1", api_key=token, max_retries=0)


def _anthropic(gw: GatewayProcess, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url + "/anthropic", api_key=token, max_retries=0)


def _gemini(gw: GatewayProcess, token: str) -> genai.Client:
    return genai.Client(api_key=token, http_options=types.HttpOptions(base_url=gw.url + "/gemini",
                                                                      api_version="v1beta"))


def _gemini_generate(gw: GatewayProcess, token: str, contents: str = "hi", headers: dict | None = None):
    client = _gemini(gw, token)  # held here: a Client closes its connection pool when collected
    config = types.GenerateContentConfig(http_options=types.HttpOptions(headers=headers)) if headers else None
    return client.models.generate_content(model="gemini-2.5-flash", contents=contents, config=config)


def _rid(response) -> uuid.UUID:
    """The request id of a response (httpx or an SDK's raw response)."""
    value = response.headers.get(REQUEST_ID)
    assert value, f"no {REQUEST_ID} header on a {response.status_code} response"
    return uuid.UUID(value)


def _openai_error(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


def _anthropic_error(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}, body
    error = body["error"]
    assert isinstance(error["type"], str) and isinstance(error["message"], str) and error["message"]
    return error


def _gemini_error(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == response.status_code, body
    assert isinstance(error["status"], str) and error["status"].isupper()
    assert isinstance(error["message"], str) and error["message"]
    return error


def _stopped_events(gw: GatewayProcess, request_ids: list[uuid.UUID]) -> dict[uuid.UUID, dict]:
    """Stop the gateway; every request left exactly one event, found by its request id."""
    assert gw.stop() == 0, gw.log()
    rows = gw.deployment.events()
    by_id = {row["event_id"]: row for row in rows}
    assert len(set(request_ids)) == len(request_ids), "request ids must be unique"
    assert len(by_id) == len(rows) == len(request_ids), rows
    assert set(by_id) == set(request_ids)
    return by_id


def _assert_refused(event: dict, outcome: str, status: int) -> None:
    assert (event["outcome"], event["status_code"]) == (outcome, status), event
    assert event["usage_source"] == "none" and event["cost_usd"] is None and event["input_tokens"] is None
    assert event["key_id"] is None and event["billing_mode"] is None


@contextmanager
def _serving(deployment):
    gw = GatewayProcess(deployment).start()
    try:
        yield gw
    finally:
        gw.stop()


def _edit_toml(deployment, old: str, new: str) -> None:
    path = deployment.path / "tollway.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


# --- 401 -----------------------------------------------------------------------------------------
def test_missing_credential_is_401_in_each_provider_format(gateway, sim):
    url = gateway.url
    with httpx.Client(timeout=10) as http:
        o = http.post(url + "/openai/v1/chat/completions", json=CHAT)
        a = http.post(url + "/anthropic/v1/messages", json=MESSAGES)
        g = http.post(url + GEMINI_PATH, json=GENERATE)
        bare = http.post(url + "/openai/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer"})
    assert (o.status_code, a.status_code, g.status_code, bare.status_code) == (401, 401, 401, 401)
    assert _openai_error(o)["type"] == "invalid_request_error" and "tw_" in _openai_error(o)["message"]
    assert _openai_error(bare)["code"] == "invalid_tollway_credential"
    assert _anthropic_error(a)["type"] == "authentication_error" and "x-api-key" in _anthropic_error(a)["message"]
    assert _gemini_error(g)["status"] == "UNAUTHENTICATED" and "x-goog-api-key" in _gemini_error(g)["message"]
    assert sim.requests == [], "nothing may reach the provider without a credential"

    events = _stopped_events(gateway, [_rid(r) for r in (o, a, g, bare)])
    for response, provider in ((o, "openai"), (a, "anthropic"), (g, "gemini"), (bare, "openai")):
        event = events[_rid(response)]
        _assert_refused(event, "unauthenticated", 401)
        assert event["provider"] == provider and event["tenant"] is None and event["user_pseudonym"] is None


def test_invalid_expired_and_revoked_tokens_get_one_identical_401(gateway, sim):
    dep = gateway.deployment
    ids = []
    ok = _openai(gateway, dep.tokens["bob"]).chat.completions.with_raw_response.create(**CHAT)
    assert ok.http_response.status_code == 200
    ids.append(_rid(ok))

    refusals: dict[str, openai.AuthenticationError] = {}

    def refused(name: str, token: str) -> None:
        with pytest.raises(openai.AuthenticationError) as caught:
            _openai(gateway, token).chat.completions.create(**CHAT)
        assert caught.value.status_code == 401
        refusals[name] = caught.value
        ids.append(_rid(caught.value.response))

    refused("unknown tw_ token", "tw_" + "x" * 40)
    refused("not a tollway token", "sk-proj-not-a-tollway-token")
    expired = dep.issue_token("erin", "acme", "erin@acme.com", expires_at=datetime.now(UTC) - timedelta(minutes=1))
    refused("expired", expired)

    # Revoke bob's token with the real CLI while the gateway runs: the very next request is refused.
    listed = run_cli(dep.path, "tokens", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [bob_id] = [t["id"] for t in json.loads(listed.stdout) if t["user"] == "bob@acme.com"]
    revoked = run_cli(dep.path, "tokens", "revoke", bob_id)
    assert revoked.returncode == 0, revoked.stderr
    refused("revoked", dep.tokens["bob"])

    bodies = {name: err.response.json() for name, err in refusals.items()}
    assert len({json.dumps(b, sort_keys=True) for b in bodies.values()}) == 1, (
        f"a 401 must not tell an unknown token from an expired or revoked one: {bodies}")
    error = _openai_error(refusals["revoked"].response)
    assert error["code"] == "invalid_tollway_credential"
    assert [r.path for r in sim.requests] == ["/v1/chat/completions"], "only the accepted request is forwarded"

    events = _stopped_events(gateway, ids)
    assert events[ids[0]]["outcome"] == "ok"
    for rid in ids[1:]:
        _assert_refused(events[rid], "unauthenticated", 401)
        assert events[rid]["tenant"] is None and events[rid]["model"] is None


def test_bad_tokens_get_401_through_anthropic_and_gemini_sdks(gateway, sim):
    with pytest.raises(anthropic.AuthenticationError) as a:
        _anthropic(gateway, "tw_not-a-real-token").messages.create(**MESSAGES)
    assert a.value.status_code == 401
    assert _anthropic_error(a.value.response)["type"] == "authentication_error"

    with pytest.raises(genai_errors.ClientError) as g:
        _gemini_generate(gateway, "tw_not-a-real-token")
    assert (g.value.code, g.value.status) == (401, "UNAUTHENTICATED")
    assert g.value.message == a.value.body["error"]["message"]

    # a Gemini key in the query string is a credential too, and just as invalid
    q = httpx.post(gateway.url + GEMINI_PATH + "?key=tw_not-a-real-token", json=GENERATE, timeout=10)
    assert q.status_code == 401 and _gemini_error(q)["message"] == g.value.message
    assert sim.requests == []

    ids = [_rid(a.value.response), _rid(g.value.response), _rid(q)]
    events = _stopped_events(gateway, ids)
    assert [events[i]["provider"] for i in ids] == ["anthropic", "gemini", "gemini"]
    for rid in ids:
        _assert_refused(events[rid], "unauthenticated", 401)


# --- 403 -----------------------------------------------------------------------------------------
def test_policy_denials_are_403_naming_tenant_and_model(gateway, sim):
    tokens = gateway.deployment.tokens
    denied = []

    with pytest.raises(anthropic.PermissionDeniedError) as bob_claude:
        _anthropic(gateway, tokens["bob"]).messages.create(**MESSAGES)
    denied.append(("acme", "anthropic/claude-sonnet-4-5", bob_claude.value.response))
    error = _anthropic_error(bob_claude.value.response)
    assert bob_claude.value.status_code == 403 and error["type"] == "permission_error"

    # dana is in engineering (allowed claude-*) and contractors (denied claude-opus-*): deny wins
    dana = _anthropic(gateway, tokens["dana"])
    allowed = dana.messages.with_raw_response.create(**MESSAGES)
    assert allowed.http_response.status_code == 200
    with pytest.raises(anthropic.PermissionDeniedError) as dana_opus:
        dana.messages.create(**{**MESSAGES, "model": "claude-opus-4-1"})
    denied.append(("acme", "anthropic/claude-opus-4-1", dana_opus.value.response))

    with pytest.raises(openai.PermissionDeniedError) as bob_gpt4o:
        _openai(gateway, tokens["bob"]).chat.completions.create(**{**CHAT, "model": "gpt-4o"})
    assert _openai_error(bob_gpt4o.value.response)["type"] == "permission_error"
    denied.append(("acme", "openai/gpt-4o", bob_gpt4o.value.response))

    with pytest.raises(genai_errors.ClientError) as bob_gemini:
        _gemini_generate(gateway, tokens["bob"])
    assert (bob_gemini.value.code, bob_gemini.value.status) == (403, "PERMISSION_DENIED")
    denied.append(("acme", "gemini/gemini-2.5-flash", bob_gemini.value.response))

    for tenant, model, response in denied:
        assert response.status_code == 403
        message = response.json()["error"]["message"]
        assert tenant in message and model in message, message
        assert "role:" not in message and "contractors" not in message, f"rule internals leaked: {message}"
    assert len(sim.requests) == 1, "a denied request never reaches the provider"

    events = _stopped_events(gateway, [_rid(allowed)] + [_rid(r) for _, _, r in denied])
    assert events[_rid(allowed)]["outcome"] == "ok"
    for tenant, model, response in denied:
        event = events[_rid(response)]
        _assert_refused(event, "denied", 403)
        assert (event["tenant"], event["model"], event["auth_method"]) == (tenant, model, "token")
        assert event["user_pseudonym"] is not None


def test_no_key_route_is_403(deployment, sim):
    routes = deployment.path / "policy" / "routes.csv"
    lines = routes.read_text().splitlines(keepends=True)
    routes.write_text("".join(line for line in lines if "gemini/*" not in line))
    carol = deployment.tokens["carol"]
    with _serving(deployment) as gw:
        with pytest.raises(genai_errors.ClientError) as no_route:
            _gemini_generate(gw, carol)
        assert (no_route.value.code, no_route.value.status) == (403, "PERMISSION_DENIED")
        assert "globex" in no_route.value.message and "gemini/gemini-2.5-flash" in no_route.value.message

        ok = _openai(gw, carol).chat.completions.with_raw_response.create(**CHAT)
        assert ok.http_response.status_code == 200
        # revoke the only key of the route while the gateway runs
        revoked = run_cli(deployment.path, "keys", "revoke", "operator-openai")
        assert revoked.returncode == 0, revoked.stderr
        with pytest.raises(openai.PermissionDeniedError) as no_key:
            _openai(gw, carol).chat.completions.create(**CHAT)
        message = _openai_error(no_key.value.response)["message"]
        assert "globex" in message and "openai/gpt-4o-mini" in message
        assert SIM_KEYS["openai"] not in no_key.value.response.text
        assert len(sim.requests) == 1

        ids = [_rid(no_route.value.response), _rid(ok), _rid(no_key.value.response)]
        events = _stopped_events(gw, ids)
    assert events[ids[1]]["outcome"] == "ok"
    for rid, model in ((ids[0], "gemini/gemini-2.5-flash"), (ids[2], "openai/gpt-4o-mini")):
        _assert_refused(events[rid], "denied", 403)
        assert (events[rid]["tenant"], events[rid]["model"]) == ("globex", model)


# --- 400 / 404 / 413 -----------------------------------------------------------------------------
def test_malformed_and_modelless_bodies_are_400(gateway, sim):
    tokens = gateway.deployment.tokens
    bob = {"authorization": f"Bearer {tokens['bob']}", "content-type": "application/json"}
    alice = {"x-api-key": tokens["alice"], "content-type": "application/json"}
    carol = {"x-goog-api-key": tokens["carol"], "content-type": "application/json"}
    chat, messages = gateway.url + "/openai/v1/chat/completions", gateway.url + "/anthropic/v1/messages"
    cases = [  # (url, headers, body, error checker)
        (chat, bob, b'{"model": "gpt-4o-mini", "messages": [', _openai_error),
        (chat, bob, json.dumps({"messages": CHAT["messages"]}).encode(), _openai_error),
        (chat, bob, json.dumps({**CHAT, "model": 42}).encode(), _openai_error),
        (chat, bob, json.dumps({**CHAT, "model": ["gpt-4o-mini"]}).encode(), _openai_error),
        (chat, bob, b'["gpt-4o-mini"]', _openai_error),
        (messages, alice, b'{"model": "claude-sonnet-4-5",', _anthropic_error),
        (messages, alice, json.dumps({k: v for k, v in MESSAGES.items() if k != "model"}).encode(), _anthropic_error),
        (gateway.url + GEMINI_PATH, carol, b"{not json", _gemini_error),
    ]
    responses = []
    with httpx.Client(timeout=10) as http:
        for url, headers, body, check in cases:
            response = http.post(url, content=body, headers=headers)
            assert response.status_code == 400, (body, response.text)
            error = check(response)
            assert error.get("type", error.get("status")) in ("invalid_request_error", "INVALID_ARGUMENT"), error
            responses.append(response)
    assert "model" in responses[1].json()["error"]["message"]
    assert "model" in responses[2].json()["error"]["message"]
    assert sim.requests == [], "a malformed request never reaches the provider"

    events = _stopped_events(gateway, [_rid(r) for r in responses])
    for response, (url, *_rest) in zip(responses, cases, strict=True):
        event = events[_rid(response)]
        _assert_refused(event, "bad_request", 400)
        assert event["tenant"] == ("globex" if "gemini" in url else "acme")


def test_openai_sdk_request_without_a_model_string_is_400(gateway, sim):
    client = _openai(gateway, gateway.deployment.tokens["bob"])
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=CHAT["messages"])
    assert caught.value.status_code == 400
    assert _openai_error(caught.value.response)["type"] == "invalid_request_error"
    assert sim.requests == []
    events = _stopped_events(gateway, [_rid(caught.value.response)])
    _assert_refused(events[_rid(caught.value.response)], "bad_request", 400)


def test_unknown_provider_is_404_in_openai_format(gateway, sim):
    token = gateway.deployment.tokens["bob"]
    with httpx.Client(timeout=10) as http:
        post = http.post(gateway.url + "/nosuch/v1/chat/completions", json=CHAT,
                         headers={"authorization": f"Bearer {token}"})
        get = http.get(gateway.url + "/mistral/v1/models", headers={"authorization": f"Bearer {token}"})
    for response, name in ((post, "nosuch"), (get, "mistral")):
        assert response.status_code == 404
        error = _openai_error(response)
        assert name in error["message"] and "openai" in error["message"], error
    assert sim.requests == []

    events = _stopped_events(gateway, [_rid(post), _rid(get)])
    for response in (post, get):
        _assert_refused(events[_rid(response)], "bad_request", 404)


def test_body_over_max_body_bytes_is_413(deployment, sim):
    _edit_toml(deployment, "[server]\n", "[server]\nmax_body_bytes = 1000\n")
    tokens = deployment.tokens
    big = "x" * 3000
    with _serving(deployment) as gw:
        small = _openai(gw, tokens["bob"]).chat.completions.with_raw_response.create(**CHAT)
        assert small.http_response.status_code == 200

        with pytest.raises(openai.APIStatusError) as o:
            _openai(gw, tokens["bob"]).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": big}])
        assert o.value.status_code == 413
        error = _openai_error(o.value.response)
        assert error["code"] == "request_too_large" and "1000" in error["message"]

        # no content-length: a chunked upload is cut off once it passes the limit
        def chunks():
            payload = json.dumps({**MESSAGES, "messages": [{"role": "user", "content": big}]}).encode()
            for i in range(0, len(payload), 500):
                yield payload[i:i + 500]

        a = httpx.post(gw.url + "/anthropic/v1/messages", content=chunks(), timeout=10,
                       headers={"x-api-key": tokens["alice"], "content-type": "application/json"})
        assert a.status_code == 413 and "content-length" not in a.request.headers
        assert _anthropic_error(a)["type"] == "request_too_large"

        with pytest.raises(genai_errors.APIError) as g:
            _gemini_generate(gw, tokens["carol"], big)
        assert g.value.code == 413 and _gemini_error(g.value.response)["code"] == 413
        assert len(sim.requests) == 1, "an oversized body never reaches the provider"

        ids = [_rid(small), _rid(o.value.response), _rid(a), _rid(g.value.response)]
        events = _stopped_events(gw, ids)
    assert events[ids[0]]["outcome"] == "ok"
    for rid in ids[1:]:
        _assert_refused(events[rid], "bad_request", 413)


# --- 502 / 504 / provider errors -----------------------------------------------------------------
def test_unreachable_provider_is_502(deployment, sim):
    closed = f"http://127.0.0.1:{free_port()}"
    deployment.write_toml(providers={name: closed for name in ("openai", "anthropic", "gemini")})
    tokens = deployment.tokens
    with _serving(deployment) as gw:
        with pytest.raises(openai.InternalServerError) as o:
            _openai(gw, tokens["bob"]).chat.completions.create(**CHAT)
        assert o.value.status_code == 502 and _openai_error(o.value.response)["code"] == "upstream_unreachable"

        with pytest.raises(anthropic.InternalServerError) as a:
            _anthropic(gw, tokens["alice"]).messages.create(**MESSAGES)
        assert a.value.status_code == 502 and _anthropic_error(a.value.response)["type"] == "api_error"

        with pytest.raises(genai_errors.ServerError) as g:
            _gemini_generate(gw, tokens["carol"])
        assert (g.value.code, g.value.status) == (502, "UNAVAILABLE")
        for response in (o.value.response, a.value.response, g.value.response):
            assert "could not be reached" in response.json()["error"]["message"]
            assert closed not in response.text, "the provider's address is not the client's business"

        ids = [_rid(o.value.response), _rid(a.value.response), _rid(g.value.response)]
        events = _stopped_events(gw, ids)
    expected = {ids[0]: ("operator-openai", "unified"), ids[1]: ("acme-anthropic", "byok"),
                ids[2]: ("operator-gemini", "unified")}
    for rid, (key, mode) in expected.items():
        event = events[rid]
        assert (event["outcome"], event["status_code"]) == ("upstream_error", 502), event
        assert (event["key_id"], event["billing_mode"]) == (key, mode)
        assert event["usage_source"] == "none" and event["cost_usd"] is None


def test_provider_timeout_is_504(deployment, sim):
    _edit_toml(deployment, "read_timeout_s = 5\n", "read_timeout_s = 1\n")
    tokens = deployment.tokens
    slow = {"x-sim-latency-ms": "4000"}
    with _serving(deployment) as gw:
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as o:
            _openai(gw, tokens["bob"]).chat.completions.create(**CHAT, extra_headers=slow)
        assert time.monotonic() - started < 3.5, "the read timeout is 1 s, not the provider's 4 s"
        assert o.value.status_code == 504 and _openai_error(o.value.response)["code"] == "upstream_timeout"

        with pytest.raises(anthropic.APIStatusError) as a:
            _anthropic(gw, tokens["alice"]).messages.create(**MESSAGES, extra_headers=slow)
        assert a.value.status_code == 504 and _anthropic_error(a.value.response)["type"] == "timeout_error"

        ids = [_rid(o.value.response), _rid(a.value.response)]
        events = _stopped_events(gw, ids)
    for rid in ids:
        event = events[rid]
        assert (event["outcome"], event["status_code"]) == ("timeout", 504), event
        assert event["usage_source"] == "none" and event["key_id"] is not None


def _direct(sim, provider: str, path: str, headers: dict) -> httpx.Response:
    """The same fault asked of the simulated provider directly, with its real key."""
    key = {"openai": {"authorization": f"Bearer {SIM_KEYS['openai']}"},
           "anthropic": {"x-api-key": SIM_KEYS["anthropic"]},
           "gemini": {"x-goog-api-key": SIM_KEYS["gemini"]}}[provider]
    return httpx.post(f"{sim.url}/{provider}{path}", json={"model": "m"}, headers={**key, **headers}, timeout=10)


def test_provider_errors_pass_through_unchanged(gateway, sim):
    tokens = gateway.deployment.tokens
    responses = []

    with pytest.raises(openai.InternalServerError) as server:
        _openai(gateway, tokens["bob"]).chat.completions.create(**CHAT, extra_headers={"x-sim-fault": "status:500"})
    assert server.value.status_code == 500
    responses.append((server.value.response, 500, _direct(sim, "openai", "/v1/chat/completions",
                                                           {"x-sim-fault": "status:500"})))

    with pytest.raises(openai.RateLimitError) as rate:
        _openai(gateway, tokens["bob"]).chat.completions.create(**CHAT, extra_headers={"x-sim-fault": "status:429"})
    assert rate.value.status_code == 429
    responses.append((rate.value.response, 429, _direct(sim, "openai", "/v1/chat/completions",
                                                         {"x-sim-fault": "status:429"})))
    # the only key of the route now cools down for the provider's Retry-After: the gateway answers itself
    seen = len(sim.requests)
    with pytest.raises(openai.RateLimitError) as cooling:
        _openai(gateway, tokens["bob"]).chat.completions.create(**CHAT)
    assert "cooling down" in cooling.value.message and cooling.value.response.headers["retry-after"] == "1"
    assert len(sim.requests) == seen, "a cooling key is not sent to the provider"
    cooled = _rid(cooling.value.response)

    with pytest.raises(anthropic.RateLimitError) as a_rate:
        _anthropic(gateway, tokens["alice"]).messages.create(**MESSAGES, extra_headers={"x-sim-fault": "status:429"})
    responses.append((a_rate.value.response, 429, _direct(sim, "anthropic", "/v1/messages",
                                                          {"x-sim-fault": "status:429"})))

    with pytest.raises(genai_errors.ServerError) as g_500:
        _gemini_generate(gateway, tokens["carol"], headers={"x-sim-fault": "status:500"})
    assert (g_500.value.code, g_500.value.status) == (500, "INTERNAL")
    responses.append((g_500.value.response, 500, _direct(sim, "gemini", "/v1beta/models/gemini-2.5-flash:generateContent",
                                                         {"x-sim-fault": "status:500"})))

    for via_gateway, status, direct in responses:
        assert via_gateway.status_code == direct.status_code == status
        assert via_gateway.content == direct.content, "the provider's own error body passes through unchanged"
        assert via_gateway.headers["content-type"] == direct.headers["content-type"]
        if status == 429:
            assert via_gateway.headers["retry-after"] == direct.headers["retry-after"] == "1"

    ids = [_rid(r) for r, _, _ in responses]
    events = _stopped_events(gateway, [*ids, cooled])
    assert (events[cooled]["outcome"], events[cooled]["status_code"]) == ("rate_limited", 429)
    for (response, status, _), provider in zip(responses, ("openai", "openai", "anthropic", "gemini"), strict=True):
        event = events[_rid(response)]
        assert (event["outcome"], event["status_code"], event["provider"]) == ("upstream_error", status, provider)
        assert event["key_id"] is not None and event["usage_source"] == "none" and event["cost_usd"] is None
