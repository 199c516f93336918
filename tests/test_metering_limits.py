"""Budgets hold without a client cap, cut streams are metered (close or drain), and an older
events.duckdb gains the billing columns in place.

The price used here is gpt-4o-mini's list price in the pinned book: $0.15 input, $0.60 output per
million tokens, context window 128,000 tokens (the bound reserved for a reply with no cap).
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import duckdb
import httpx
import openai
import pytest

from proxy.simulator import count_tokens
from tests.helpers import ROUTES, SIM_KEYS, GatewayProcess

pytestmark = pytest.mark.timeout(120)

IN, OUT = Decimal("0.15"), Decimal("0.60")
BUDGET = Decimal("0.10")
LONG_REPLY = 20_000  # tokens; $0.012 of output each, far beyond the old 4,096-token default reservation
PROMPT = "Write a very long saga about toll roads."
MESSAGES = [{"role": "user", "content": PROMPT}]


def _cost(input_tokens: int, output_tokens: int) -> Decimal:
    return ((input_tokens * IN + output_tokens * OUT) / 1_000_000).quantize(Decimal("1e-9"))


async def _flood(gw: GatewayProcess, token: str, stream: bool, cap: int | None, count: int = 200) -> list[int]:
    body: dict = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": stream}
    if cap is not None:
        body["max_tokens"] = cap
    headers = {"authorization": f"Bearer {token}", "x-sim-output-tokens": str(LONG_REPLY)}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as http:
        async def one() -> int:
            async with http.stream("POST", gw.url + "/openai/v1/chat/completions", json=body,
                                   headers=headers) as response:
                await response.aread()
                return response.status_code
        return await asyncio.gather(*(one() for _ in range(count)))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("cap", [None, LONG_REPLY], ids=["uncapped", "capped"])
def test_200_concurrent_long_replies_never_overspend_a_small_budget(deployment, stream, cap):
    user = f"flood-{'sse' if stream else 'json'}-{cap or 'none'}@acme.com"
    token = deployment.issue_token("flood", "acme", user)
    (deployment.path / "policy" / "limits.csv").write_text(f"tenant,subject,metric,window,limit\nacme,*,usd,month,{BUDGET}\n")
    gw = GatewayProcess(deployment).start()
    try:
        statuses = asyncio.run(_flood(gw, token, stream, cap))
    finally:
        assert gw.stop() == 0, gw.log()
    served = [e for e in deployment.events() if e["outcome"] == "ok"]
    refused = [e for e in deployment.events() if e["outcome"] == "budget_exceeded"]
    assert sorted(statuses) == sorted([200] * len(served) + [429] * len(refused)) and len(statuses) == 200
    assert served and refused, statuses
    one_reply = _cost(count_tokens(MESSAGES), LONG_REPLY)  # 10 input tokens, 20,000 output: $0.0120015
    assert one_reply == Decimal("0.012001500")
    assert all(e["cost_usd"] == one_reply and e["usage_source"] == "reported" for e in served), served[:2]
    spent = sum(e["cost_usd"] for e in served)
    assert spent <= BUDGET, f"{len(served)} replies spent {spent} of a {BUDGET} budget"


def _stream_and_leave(gw: GatewayProcess, token: str, chunks: int, delay_ms: int) -> uuid.UUID:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    headers = {"authorization": f"Bearer {token}", "x-sim-output-tokens": "40", "x-sim-chunks": str(chunks),
               "x-sim-chunk-delay-ms": str(delay_ms)}
    with httpx.Client(timeout=10) as http, http.stream("POST", gw.url + "/openai/v1/chat/completions", json=body,
                                                        headers=headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # leaving the block closes the connection after the first chunk
        return uuid.UUID(response.headers["x-tollway-request-id"])


@pytest.mark.parametrize("mode", ["close", "drain"])
def test_a_client_leaving_mid_stream_is_metered_by_estimate_or_by_draining(deployment, mode):
    deployment.write_toml(f'[metering]\non_client_disconnect = "{mode}"\ndrain_timeout_s = 10\n')
    gw = GatewayProcess(deployment).start()
    try:
        left = _stream_and_leave(gw, deployment.tokens["bob"], chunks=8, delay_ms=100)
    finally:
        assert gw.stop() == 0, gw.log()
    [event] = [e for e in deployment.events() if e["event_id"] == left]
    assert (event["outcome"], event["status_code"]) == ("cancelled", 499), event
    if mode == "drain":  # the provider's own figures, read after the client left
        assert (event["usage_source"], event["output_tokens"]) == ("reported", 40), event
        assert event["input_tokens"] == count_tokens(MESSAGES)
        assert event["cost_usd"] == _cost(count_tokens(MESSAGES), 40)
        assert event["latency_ms"] >= 700, "the stream was read to its end"
    else:  # closed at once: the output is an estimate from what was relayed
        assert event["usage_source"] == "estimated" and event["output_tokens"] < 40, event
        assert event["latency_ms"] < 700, event


def test_draining_is_bounded_in_time(deployment):
    deployment.write_toml('[metering]\non_client_disconnect = "drain"\ndrain_timeout_s = 0.5\n')
    gw = GatewayProcess(deployment).start()
    try:
        left = _stream_and_leave(gw, deployment.tokens["bob"], chunks=20, delay_ms=500)  # a 10-second stream
    finally:
        assert gw.stop() == 0, gw.log()
    [event] = [e for e in deployment.events() if e["event_id"] == left]
    assert (event["outcome"], event["usage_source"]) == ("cancelled", "estimated"), event
    assert event["latency_ms"] < 3000, "the drain stopped at drain_timeout_s"


def test_an_older_events_database_gains_the_billing_columns_in_place(deployment):
    path = deployment.path / "events.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE events (" + ", ".join(_columns_before_the_price_book()) + ")")
    con.execute("INSERT INTO events (event_id, ts, streamed, status_code, outcome, usage_source, cost_usd, attempts, "
                "demo) VALUES (uuid(), now(), false, 200, 'ok', 'reported', 0.5, 1, false)")
    con.close()
    gw = GatewayProcess(deployment).start()
    try:
        client = openai.OpenAI(base_url=gw.url + "/openai/v1", api_key=deployment.tokens["bob"], max_retries=0)
        reply = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    finally:
        assert gw.stop() == 0, gw.log()
    events = deployment.events()
    assert len(events) == 2 and events[0]["cost_usd"] == Decimal("0.5") and events[0]["priced_model"] is None
    new = events[1]
    assert str(new["event_id"]) == reply.headers["x-tollway-request-id"]
    assert (new["priced_model"], new["price_source"], new["service_tier"]) == ("gpt-4o-mini", "genai-prices 0.2.5",
                                                                              "default")
    assert Decimal(reply.headers["x-tollway-cost-usd"]) == new["cost_usd"] == _cost(count_tokens(MESSAGES), 12)


def _columns_before_the_price_book() -> list[str]:
    return ["event_id UUID NOT NULL", "ts TIMESTAMPTZ NOT NULL", "tenant VARCHAR", "user_pseudonym UUID",
            "auth_method VARCHAR", "provider VARCHAR", "model VARCHAR", "endpoint VARCHAR", "streamed BOOLEAN NOT NULL",
            "status_code INTEGER NOT NULL", "outcome VARCHAR NOT NULL", "key_id VARCHAR", "billing_mode VARCHAR",
            "input_tokens BIGINT", "output_tokens BIGINT", "cached_input_tokens BIGINT", "cache_write_tokens BIGINT",
            "reasoning_tokens BIGINT", "usage_source VARCHAR NOT NULL", "cost_usd DECIMAL(18,9)",
            "latency_ms DOUBLE", "ttfb_ms DOUBLE", "upstream_ms DOUBLE", "attempts INTEGER NOT NULL",
            "demo BOOLEAN NOT NULL"]


def test_an_azure_deployment_is_priced_as_the_model_tollway_toml_says_it_serves(deployment, sim):
    deployment.write_toml(providers={"azure": sim.url}, extra='[providers.azure.deployments]\nprod-4o = "gpt-4o"\n')
    toml = deployment.path / "tollway.toml"
    toml.write_text(toml.read_text().replace(f'base_url = "{sim.url}"\n', f'base_url = "{sim.url}"\nstyle = "azure"\n'))
    deployment.add_key("operator-azure", "azure", SIM_KEYS["openai"])
    (deployment.path / "policy" / "routes.csv").write_text(ROUTES + "p, *, azure/*, operator-azure\n")
    with (deployment.path / "policy" / "access.csv").open("a") as access:
        access.write("p, *, globex, azure/*, allow\n")
    (deployment.path / "policy" / "limits.csv").write_text("tenant,subject,metric,window,limit\nglobex,tenant,usd,month,10\n")
    gw = GatewayProcess(deployment).start()
    try:
        client = openai.AzureOpenAI(azure_endpoint=gw.url + "/azure", api_key=deployment.tokens["carol"],
                                    api_version="2024-10-21", max_retries=0)
        reply = client.chat.completions.with_raw_response.create(model="prod-4o", messages=MESSAGES)
        with pytest.raises(openai.PermissionDeniedError) as unmapped:  # a deployment tollway.toml does not name
            client.chat.completions.create(model="prod-mystery", messages=MESSAGES)
    finally:
        assert gw.stop() == 0, gw.log()
    assert unmapped.value.code == "model_unpriced" and "azure/prod-mystery" in unmapped.value.message
    served = next(e for e in deployment.events() if str(e["event_id"]) == reply.headers["x-tollway-request-id"])
    assert (served["model"], served["priced_model"], served["price_source"]) == ("azure/prod-4o", "gpt-4o",
                                                                                  "genai-prices 0.2.5")
    # gpt-4o: $2.50 input, $10 output per million tokens; 10 prompt tokens, a 12-token reply
    assert served["cost_usd"] == Decimal(reply.headers["x-tollway-cost-usd"]) == Decimal("0.000145000")
