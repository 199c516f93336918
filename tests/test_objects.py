"""Tenant-owned objects, model-less calls, streamed uploads and metered batch results, through a real
gateway with the official SDKs and the simulated provider (whose objects every key can see, like a
provider account several tenants share)."""

from __future__ import annotations

import io
import json
import threading
import time
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest

from tests.helpers import SIM_KEYS, GatewayProcess

MTOK = Decimal(1_000_000)


def _events(gw: GatewayProcess) -> list[dict]:
    assert gw.stop() == 0, gw.log()
    return gw.deployment.events()


def _upload(client: openai.OpenAI, content: bytes = b'{"x": 1}\n', name: str = "data.jsonl"):
    return client.files.create(file=(name, io.BytesIO(content)), purpose="batch")


def _refused_as_missing(exc: pytest.ExceptionInfo, object_id: str) -> None:
    assert exc.value.status_code == 404
    body = exc.value.body if isinstance(exc.value.body, dict) else {}
    assert body.get("code") == "object_not_found", exc.value.body
    assert object_id in body["message"] and "created them" in body["message"]


def test_a_tenants_files_are_invisible_to_another_tenant_and_lists_show_only_its_own(openai_for, sim, gateway):
    bob, carol = openai_for("bob"), openai_for("carol")
    mine = _upload(bob, b"acme data\n")
    theirs = _upload(carol, b"globex data\n")
    assert bob.files.retrieve(mine.id).id == mine.id
    assert bob.files.content(mine.id).read() == b"acme data\n"
    seen = len(sim.requests)
    for call in (carol.files.retrieve, carol.files.content, carol.files.delete):
        with pytest.raises(openai.NotFoundError) as exc:
            call(mine.id)
        _refused_as_missing(exc, mine.id)
    with pytest.raises(openai.NotFoundError) as exc:  # an id Tollway never saw: the very same answer
        bob.files.retrieve("file-never-made")
    _refused_as_missing(exc, "file-never-made")
    assert len(sim.requests) == seen, "refused calls never reach the provider"

    assert [f.id for f in bob.files.list().data] == [mine.id]
    assert [f.id for f in carol.files.list().data] == [theirs.id]
    assert bob.files.delete(mine.id).deleted is True

    events = [e for e in _events(gateway) if e["endpoint"].startswith("openai/files.")]
    refused = [e for e in events if e["status_code"] == 404]
    assert len(refused) == 4 and {e["outcome"] for e in refused} == {"denied"}
    assert {e["tenant"] for e in refused} == {"globex", "acme"}
    uploads = [e for e in events if e["endpoint"] == "openai/files.create"]
    assert [(e["status_code"], e["model"], e["cost_usd"], e["key_id"]) for e in uploads] == [
        (200, None, None, "operator-openai")] * 2


def test_an_object_in_a_body_field_is_checked_like_one_in_the_path(openai_for, gateway):
    bob, carol = openai_for("bob"), openai_for("carol")
    mine = _upload(bob, b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n')
    with pytest.raises(openai.NotFoundError) as exc:
        carol.batches.create(input_file_id=mine.id, endpoint="/v1/chat/completions", completion_window="24h")
    _refused_as_missing(exc, mine.id)


def test_an_admin_rule_opens_objects_that_tollway_never_saw(gateway, sim):
    dep = gateway.deployment
    direct = httpx.post(sim.url + "/openai/v1/files", headers={"authorization": f"Bearer {SIM_KEYS['openai']}"},
                        files={"file": ("direct.txt", b"made at the provider")}, data={"purpose": "user_data"})
    file_id = direct.json()["id"]
    admin = dep.issue_token("root", "acme", "root@acme.com", roles=("platform-admins",))
    client = openai.OpenAI(base_url=gateway.url + "/openai/v1", api_key=admin, max_retries=0)
    with pytest.raises(openai.NotFoundError):  # `*` never opens it
        client.files.retrieve(file_id)
    operations = dep.path / "policy" / "operations.csv"
    operations.write_text(operations.read_text() + "p, role:platform-admins, *, openai/objects.unowned, allow\n")
    deadline = time.monotonic() + 10
    while True:
        try:
            assert client.files.retrieve(file_id).id == file_id
            break
        except openai.NotFoundError:
            assert time.monotonic() < deadline, "the policy reload did not take effect"
            time.sleep(0.2)
    bob = openai.OpenAI(base_url=gateway.url + "/openai/v1", api_key=dep.tokens["bob"], max_retries=0)
    with pytest.raises(openai.NotFoundError):  # the rule names a role; bob has none
        bob.files.retrieve(file_id)


def test_stored_responses_belong_to_their_tenant_unless_not_stored(openai_for, gateway):
    bob, carol = openai_for("bob"), openai_for("carol")
    stored = bob.responses.create(model="gpt-4o-mini", input="hello")
    streamed = bob.responses.create(model="gpt-4o-mini", input="hello", stream=True)
    streamed_id = next(e.response.id for e in streamed if e.type == "response.created")
    list(streamed)  # read to its end
    unstored = bob.responses.create(model="gpt-4o-mini", input="hello", store=False)
    assert bob.responses.retrieve(stored.id).id == stored.id
    assert bob.responses.retrieve(streamed_id).id == streamed_id
    for response_id in (stored.id, streamed_id):
        with pytest.raises(openai.NotFoundError):
            carol.responses.retrieve(response_id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(unstored.id)


def test_batch_results_are_metered_once_per_line_at_the_batch_price_for_the_batchs_creator(openai_for, gateway):
    bob, carol = openai_for("bob"), openai_for("carol")
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "max_tokens": 5 + i, "messages": [{"role": "user", "content": "x" * 40 * i}]}}
             for i in range(1, 4)]
    source = _upload(bob, "".join(json.dumps(line) + "\n" for line in lines).encode())
    batch = bob.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        carol.batches.retrieve(batch.id)
    done = bob.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id
    with pytest.raises(openai.NotFoundError):  # the results are the batch's owner's
        carol.files.content(done.output_file_id)
    first = bob.files.content(done.output_file_id).read()
    again = bob.files.content(done.output_file_id).read()
    assert first == again
    results = [json.loads(line) for line in first.splitlines()]
    assert [r["custom_id"] for r in results] == ["q1", "q2", "q3"]

    events = _events(gateway)
    create = next(e for e in events if e["endpoint"] == "openai/batches.create")
    assert (create["status_code"], create["cost_usd"], create["model"]) == (200, None, None)
    bob_pseudonym = create["user_pseudonym"]
    metered = sorted((e for e in events if e["endpoint"] == "openai/batches.results"), key=lambda e: e["input_tokens"])
    assert len(metered) == 3, "each line once, though the results were read twice"
    for event, result in zip(metered, sorted(results, key=lambda r: r["response"]["body"]["usage"]["prompt_tokens"]),
                             strict=True):
        usage = result["response"]["body"]["usage"]
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        # gpt-4o-mini at the batch rate: $0.075 in, $0.30 out per million tokens (half the interactive price)
        expected = Decimal(prompt) * Decimal("0.075") / MTOK + Decimal(completion) * Decimal("0.30") / MTOK
        assert (event["tenant"], event["user_pseudonym"], event["model"]) == ("acme", bob_pseudonym, "openai/gpt-4o-mini")
        assert (event["input_tokens"], event["output_tokens"], event["service_tier"]) == (prompt, completion, "batch")
        assert event["cost_usd"] == expected and event["outcome"] == "ok" and event["key_id"] == "operator-openai"
        assert event["billing_mode"] == "unified"


def test_anthropic_message_batch_results_are_metered_and_read_through_the_gateway(anthropic_for, gateway, sim):
    alice = anthropic_for("alice")
    requests = [{"custom_id": f"m{i}", "params": {"model": "claude-haiku-4-5", "max_tokens": 3 + i,
                                                  "messages": [{"role": "user", "content": "hi " * 10 * i}]}}
                for i in range(1, 3)]
    batch = alice.messages.batches.create(requests=requests)
    assert batch.results_url.startswith(gateway.url + "/anthropic/"), "the SDK follows it with alice's token"
    results = list(alice.messages.batches.results(batch.id))
    assert [r.custom_id for r in results] == ["m1", "m2"]
    assert all(r.headers.get("x-api-key") == SIM_KEYS["anthropic"] for r in sim.requests), "no Tollway token leaked"
    carol = anthropic.Anthropic(base_url=gateway.url + "/anthropic", api_key=gateway.deployment.tokens["carol"],
                                max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        carol.messages.batches.retrieve(batch.id)

    metered = sorted((e for e in _events(gateway) if e["endpoint"] == "anthropic/batches.results"),
                     key=lambda e: e["input_tokens"])
    assert len(metered) == 2
    for event, result in zip(metered, sorted(results, key=lambda r: r.result.message.usage.input_tokens), strict=True):
        usage = result.result.message.usage
        # claude-haiku-4-5 at the batch rate: $0.50 in, $2.50 out per million tokens
        expected = Decimal(usage.input_tokens) * Decimal("0.5") / MTOK + Decimal(usage.output_tokens) * Decimal("2.5") / MTOK
        assert (event["input_tokens"], event["output_tokens"], event["cost_usd"]) == (
            usage.input_tokens, usage.output_tokens, expected)
        assert (event["key_id"], event["billing_mode"], event["service_tier"]) == ("acme-anthropic", "byok", "batch")


def test_a_multipart_call_is_governed_by_its_model_form_field(openai_for, gateway):
    bob, carol = openai_for("bob"), openai_for("carol")
    audio = ("clip.wav", io.BytesIO(b"RIFF" + b"\0" * 1000))
    with pytest.raises(openai.PermissionDeniedError) as exc:  # acme may use only gpt-4o-mini
        bob.audio.transcriptions.create(model="whisper-1", file=audio)
    assert "openai/whisper-1" in exc.value.message
    with pytest.raises(openai.NotFoundError):  # globex may: it reaches the provider (which has no such endpoint)
        carol.audio.transcriptions.create(model="whisper-1", file=("clip.wav", io.BytesIO(b"RIFF")))
    headers = {"authorization": f"Bearer {gateway.deployment.tokens['carol']}"}
    missing = httpx.post(gateway.url + "/openai/v1/audio/transcriptions", headers=headers,
                         files={"file": ("clip.wav", b"RIFF")})
    assert missing.status_code == 400 and "model" in missing.json()["error"]["message"]
    events = [e for e in _events(gateway) if e["endpoint"] == "openai/audio.transcriptions.create"]
    assert [(e["model"], e["status_code"], e["outcome"]) for e in events] == [
        ("openai/whisper-1", 403, "denied"), ("openai/whisper-1", 404, "upstream_error"), (None, 400, "bad_request")]


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def test_a_100_mb_upload_streams_through_with_flat_memory(gateway, sim):
    size, chunk = 100 * 1024 * 1024, b"y" * (1024 * 1024)
    boundary = "tollwayboundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body():
        yield head
        for _ in range(size // len(chunk)):
            yield chunk
        yield tail

    peak_before = _peak_rss_kib(gateway.proc.pid)
    response = httpx.post(gateway.url + "/openai/v1/files", content=body(), timeout=60,
                          headers={"authorization": f"Bearer {gateway.deployment.tokens['bob']}",
                                   "content-type": f"multipart/form-data; boundary={boundary}",
                                   "content-length": str(len(head) + size + len(tail))})
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == size, "every byte reached the provider"
    growth_mib = (_peak_rss_kib(gateway.proc.pid) - peak_before) / 1024
    print(f"peak RSS growth for a 100 MiB upload: {growth_mib:.1f} MiB")
    assert growth_mib < 40, f"the gateway's peak memory grew {growth_mib:.0f} MiB for a 100 MiB upload"


def test_an_upload_over_max_upload_bytes_is_refused_before_it_is_read(deployment, sim):
    toml = deployment.path / "tollway.toml"
    toml.write_text(toml.read_text().replace("[server]\n", "[server]\nmax_upload_bytes = 1000\n", 1))
    gw = GatewayProcess(deployment).start()
    try:
        response = httpx.post(gw.url + "/openai/v1/files", headers={"authorization": f"Bearer {deployment.tokens['bob']}"},
                              files={"file": ("big.bin", b"z" * 5000)}, data={"purpose": "batch"})
        assert response.status_code == 413
        assert "max_upload_bytes" in response.json()["error"]["message"]
        assert not [r for r in sim.requests if r.path == "/v1/files"]
    finally:
        gw.stop()


def test_an_unfinished_upload_is_not_forwarded_as_a_whole_one(gateway, sim):
    """A client that stops sending mid-body: the provider's request fails, nothing is recorded as a success."""
    headers = {"authorization": f"Bearer {gateway.deployment.tokens['bob']}",
               "content-type": "multipart/form-data; boundary=b", "content-length": "100000"}
    done = threading.Event()

    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n' + b"x" * 1000
        done.wait(0.5)
        raise RuntimeError("client gave up")

    with pytest.raises((RuntimeError, httpx.HTTPError)):
        httpx.post(gateway.url + "/openai/v1/files", headers=headers, content=body(), timeout=10)
    events = [e for e in _events(gateway) if e["endpoint"] == "openai/files.create"]
    assert len(events) == 1 and events[0]["outcome"] != "ok", events


def _genai(gw: GatewayProcess, token: str):
    from google import genai
    from google.genai import types
    return genai.Client(api_key=token, http_options=types.HttpOptions(base_url=gw.url + "/gemini",
                                                                       api_version="v1beta"))


def test_gemini_resumable_upload_goes_through_the_gateway_and_the_file_is_the_tenants(gateway, sim):
    from google.genai import errors
    carol, bob = (_genai(gateway, gateway.deployment.tokens[name]) for name in ("carol", "bob"))
    content = b"gemini file " * 1000
    uploaded = carol.files.upload(file=io.BytesIO(content), config={"mime_type": "text/plain"})
    assert uploaded.name.startswith("files/") and int(uploaded.size_bytes) == len(content)
    uploads = [r for r in sim.requests if r.path == "/upload/v1beta/files"]
    assert len(uploads) == 2, "start, then the bytes: both through the gateway, not straight to the provider"
    assert all(r.headers.get("x-goog-api-key") == SIM_KEYS["gemini"] for r in uploads)
    assert carol.files.get(name=uploaded.name).name == uploaded.name
    with pytest.raises(errors.ClientError) as exc:
        bob.files.get(name=uploaded.name)
    assert exc.value.code == 404
    assert [f.name for f in carol.files.list()] == [uploaded.name]
    assert list(bob.files.list()) == []


def test_gemini_inline_batch_results_are_metered_once_at_the_batch_price(gateway, sim):
    from google.genai import errors
    carol, bob = (_genai(gateway, gateway.deployment.tokens[name]) for name in ("carol", "bob"))
    requests = [{"contents": [{"parts": [{"text": "hello " * 5 * i}], "role": "user"}]} for i in range(1, 3)]
    job = carol.batches.create(model="gemini-2.5-flash", src=requests)
    with pytest.raises(errors.ClientError) as exc:
        bob.batches.get(name=job.name)
    assert exc.value.code == 404
    done = carol.batches.get(name=job.name)
    again = carol.batches.get(name=job.name)
    answers = [r.response.usage_metadata for r in done.dest.inlined_responses]
    assert len(answers) == 2 and len(again.dest.inlined_responses) == 2

    events = _events(gateway)
    submit = next(e for e in events if e["endpoint"] == "gemini/batches.create")
    assert (submit["model"], submit["cost_usd"], submit["status_code"]) == ("gemini/gemini-2.5-flash", None, 200)
    metered = sorted((e for e in events if e["endpoint"] == "gemini/batches.results"), key=lambda e: e["input_tokens"])
    assert len(metered) == 2, "each inline response once, though the batch was read twice"
    for event, usage in zip(metered, sorted(answers, key=lambda u: u.prompt_token_count), strict=True):
        # gemini-2.5-flash at the batch rate: $0.15 in, $1.25 out per million tokens
        expected = (Decimal(usage.prompt_token_count) * Decimal("0.15")
                    + Decimal(usage.candidates_token_count) * Decimal("1.25")) / MTOK
        assert (event["tenant"], event["input_tokens"], event["output_tokens"]) == (
            "globex", usage.prompt_token_count, usage.candidates_token_count)
        assert event["cost_usd"] == expected and event["service_tier"] == "batch"


def test_gemini_cached_contents_are_the_tenants_in_the_path_and_in_a_generate_call(gateway, sim):
    dep = gateway.deployment
    carol = {"x-goog-api-key": dep.tokens["carol"]}
    gina = dep.issue_token("gina", "globex", "gina@globex.com")  # the same tenant: may use it
    created = httpx.post(gateway.url + "/gemini/v1beta/cachedContents", headers=carol,
                         json={"model": "models/gemini-2.5-flash", "contents": [{"parts": [{"text": "context"}]}]})
    assert created.status_code == 200, created.text
    name = created.json()["name"]
    other = {"x-goog-api-key": dep.tokens["bob"]}
    assert httpx.get(f"{gateway.url}/gemini/v1beta/{name}", headers={"x-goog-api-key": gina}).status_code == 200
    refused = httpx.get(f"{gateway.url}/gemini/v1beta/{name}", headers=other)
    assert refused.status_code == 404 and refused.json()["error"]["status"] == "NOT_FOUND"
    generate = {"contents": [{"parts": [{"text": "hi"}]}], "cachedContent": name}
    root = dep.issue_token("root", "acme", "root@acme.com", roles=("platform-admins",))  # may use any model
    used = httpx.post(gateway.url + "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
                      headers={"x-goog-api-key": root}, json=generate)
    assert used.status_code == 404, "another tenant's cache, named in the body"
    assert httpx.post(gateway.url + "/gemini/v1beta/models/gemini-2.5-flash:generateContent", headers=carol,
                      json=generate).status_code == 200
    listed = httpx.get(gateway.url + "/gemini/v1beta/cachedContents", headers={"x-goog-api-key": root})
    assert listed.json()["cachedContents"] == []
    events = [e for e in _events(gateway) if e["endpoint"] == "gemini/cached_contents.create"]
    assert [(e["model"], e["cost_usd"]) for e in events] == [("gemini/gemini-2.5-flash", None)]
