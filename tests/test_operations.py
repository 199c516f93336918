"""Each wire format's operation table (a truth table of method + path -> operation name), and
policy/operations.csv governing operations through a real gateway."""

from __future__ import annotations

import time

import httpx
import pytest

from proxy.providers.operations import ANTHROPIC, GEMINI, OPENAI


@pytest.mark.parametrize("method, path, operation", [
    ("POST", "/v1/chat/completions", "chat.completions.create"),
    ("GET", "/v1/chat/completions/chatcmpl-1", "chat.completions.retrieve"),
    ("GET", "/v1/chat/completions/chatcmpl-1/messages", "chat.completions.messages.list"),
    ("POST", "/v1/responses", "responses.create"),
    ("GET", "/v1/responses/resp_1", "responses.retrieve"),
    ("POST", "/v1/responses/resp_1/cancel", "responses.cancel"),
    ("GET", "/v1/responses/resp_1/input_items", "responses.input_items.list"),
    ("POST", "/v1/responses/input_tokens", "responses.input_tokens.count"),
    ("GET", "/v1/realtime", "realtime"),
    ("POST", "/v1/embeddings", "embeddings.create"),
    ("POST", "/v1/audio/transcriptions", "audio.transcriptions.create"),
    ("GET", "/v1/models", "models.list"),
    ("GET", "/v1/models/ft:gpt-4o-mini:acme::abc123", "models.retrieve"),
    ("POST", "/v1/files", "files.create"),
    ("GET", "/v1/files", "files.list"),
    ("GET", "/v1/files/file-1", "files.retrieve"),
    ("DELETE", "/v1/files/file-1", "files.delete"),
    ("GET", "/v1/files/file-1/content", "files.content"),
    ("POST", "/v1/uploads/upload_1/parts", "uploads.parts.create"),
    ("POST", "/v1/batches", "batches.create"),
    ("GET", "/v1/batches/batch_1", "batches.retrieve"),
    ("POST", "/v1/batches/batch_1/cancel", "batches.cancel"),
    ("POST", "/v1/fine_tuning/jobs", "fine_tuning.jobs.create"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-1/checkpoints", "fine_tuning.other"),
    ("POST", "/v1/vector_stores/vs_1/search", "vector_stores.search"),
    ("POST", "/v1/vector_stores/vs_1/file_batches", "vector_stores.files"),
    ("POST", "/v1/organization/admin_api_keys", "admin"),
    ("GET", "/v1/organization", "admin"),
    ("GET", "/v1/organizationx", "other"),  # a prefix of a segment is not the segment
    ("POST", "/v1/assistants", "other"),
    ("PUT", "/v1/chat/completions", "other"),
    ("POST", "/v1", "other"),
    # Azure OpenAI: a deployment in the path, or the v1 API
    ("POST", "/openai/deployments/prod-4o/chat/completions", "chat.completions.create"),
    ("POST", "/openai/deployments/prod-4o/embeddings", "embeddings.create"),
    ("POST", "/openai/v1/responses", "responses.create"),
])
def test_openai_operations(method, path, operation):
    assert OPENAI.name(method, path) == operation


@pytest.mark.parametrize("method, path, operation", [
    ("POST", "/v1/messages", "messages.create"),
    ("POST", "/v1/messages/count_tokens", "messages.count_tokens"),
    ("POST", "/v1/messages/batches", "messages.batches.create"),
    ("GET", "/v1/messages/batches", "messages.batches.list"),
    ("GET", "/v1/messages/batches/msgbatch_1", "messages.batches.retrieve"),
    ("GET", "/v1/messages/batches/msgbatch_1/results", "messages.batches.results"),
    ("POST", "/v1/messages/batches/msgbatch_1/cancel", "messages.batches.cancel"),
    ("GET", "/v1/models", "models.list"),
    ("GET", "/v1/files/file_1/content", "files.content"),
    ("GET", "/v1/organizations/users", "admin"),
    ("POST", "/v1/skills", "other"),
])
def test_anthropic_operations(method, path, operation):
    assert ANTHROPIC.name(method, path) == operation


@pytest.mark.parametrize("method, path, operation", [
    ("POST", "/v1beta/models/gemini-2.5-flash:generateContent", "generate_content"),
    ("POST", "/v1/models/gemini-2.5-flash:generateContent", "generate_content"),
    ("POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", "generate_content_stream"),
    ("POST", "/v1beta/models/gemini-2.5-flash:countTokens", "count_tokens"),
    ("POST", "/v1beta/models/text-embedding-004:embedContent", "embed_content"),
    ("POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", "batches.create"),
    ("GET", "/v1beta/models", "models.list"),
    ("GET", "/v1beta/models/gemini-2.5-flash", "models.get"),
    ("POST", "/upload/v1beta/files", "files.upload"),
    ("GET", "/v1beta/files/abc", "files.get"),
    ("POST", "/v1beta/cachedContents", "cached_contents.create"),
    ("PATCH", "/v1beta/cachedContents/c1", "cached_contents.update"),
    ("GET", "/v1beta/batches/b1", "batches.get"),
    ("POST", "/v1beta/batches/b1:cancel", "batches.cancel"),
    ("POST", "/v1beta/tunedModels", "other"),
])
def test_gemini_operations(method, path, operation):
    assert GEMINI.name(method, path) == operation


def test_invented_paths_do_not_grow_the_cache_without_bound():
    for i in range(25_000):
        assert OPENAI.name("GET", f"/v1/files/file-{i}") == "files.retrieve"
    assert len(OPENAI._cache) <= 10_000


# --- policy/operations.csv through a real gateway ------------------------------------------------------
def test_operations_are_governed_by_operations_csv_in_each_routes_format(gateway, sim):
    dep = gateway.deployment
    bob = {"authorization": f"Bearer {dep.tokens['bob']}"}
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        tuned = http.post("/openai/v1/fine_tuning/jobs", headers=bob,
                          json={"model": "gpt-4o-mini", "training_file": "file-abc"})
        admin = http.get("/openai/v1/organization/users", headers=bob)
        anthropic_admin = http.get("/anthropic/v1/organizations/users",
                                   headers={"x-api-key": dep.tokens["alice"], "anthropic-version": "2023-06-01"})
        assert sim.requests == [], "a refused operation never reaches the provider"
        chat = http.post("/openai/v1/chat/completions", headers=bob,
                         json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        # the governance lead lets platform admins reach the admin API: `*` alone never would
        rules = dep.path / "policy" / "operations.csv"
        rules.write_text(rules.read_text() + "p, *, acme, *, allow\np, bob@acme.com, acme, openai/admin, allow\n")
        deadline = time.monotonic() + 10
        while (after := http.get("/openai/v1/organization/users", headers=bob)).status_code == 403 \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        still = http.post("/openai/v1/fine_tuning/jobs", headers=bob,
                          json={"model": "gpt-4o-mini", "training_file": "file-abc"})
    assert tuned.status_code == 403
    assert tuned.json()["error"]["code"] == "operation_not_allowed"
    assert tuned.json()["error"]["message"] == ("Tenant 'acme' may not call 'openai/fine_tuning.jobs.create'. Ask "
                                                "your governance lead to allow it in policy/operations.csv.")
    assert admin.status_code == 403 and "'openai/admin'" in admin.json()["error"]["message"]
    assert anthropic_admin.status_code == 403
    assert anthropic_admin.json()["error"]["type"] == "permission_error"
    assert chat.status_code == 200
    assert after.status_code != 403, after.text  # reached the provider (which has no such API: its own answer)
    assert still.status_code == 403, "a deny line still wins over `p, *, acme, *, allow`"
    assert gateway.stop() == 0
    events = {row["endpoint"]: row for row in dep.events()}
    assert (events["openai/fine_tuning.jobs.create"]["outcome"], events["openai/admin"]["tenant"]) == ("denied", "acme")


@pytest.mark.parametrize("name", ["auth", "healthz", "metrics"])
def test_a_provider_cannot_take_the_gateways_own_paths(tmp_path, name):
    from proxy.settings import SettingsError, load_settings
    (tmp_path / "tollway.toml").write_text(f'[providers.{name}]\nbase_url = "http://127.0.0.1:9"\n')
    with pytest.raises(SettingsError, match=f"/{name} is the gateway's own endpoint"):
        load_settings(tmp_path)
