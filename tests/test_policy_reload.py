"""Hot reload against a running `tollway serve`: edits take effect within seconds, a broken edit is
refused whole (previous policy keeps serving, the error shows in the log, `/readyz` and the audit
log), reloads under concurrent traffic fail no request and never expose a half-applied set, and
CLI changes to tokens and keys are noticed while the gateway runs."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from policy.files import POLICY_FILES
from tests.helpers import GatewayProcess, run_cli

pytestmark = pytest.mark.timeout(90)

#: No rate limits or budgets, so that bursts of test traffic are never refused with 429.
NO_LIMITS = "tenant,subject,metric,window,limit\n"
BOB_GPT4O = "p, bob@acme.com, acme, openai/gpt-4o, allow\n"


@pytest.fixture
def live(deployment):
    (deployment.path / "policy/limits.csv").write_text(NO_LIMITS)
    gw = GatewayProcess(deployment).start()
    yield gw
    gw.stop()


def chat(gw: GatewayProcess, token: str, model: str, client: httpx.Client | None = None, **headers) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    send = client.post if client else httpx.post
    return send(gw.url + "/openai/v1/chat/completions", json=body, timeout=10,
                headers={"authorization": f"Bearer {token}", **headers})


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Seconds until `predicate()` held; fails the test after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


def readyz(gw: GatewayProcess) -> httpx.Response:
    return httpx.get(gw.url + "/readyz", timeout=5)


def access_file(gw: GatewayProcess) -> Path:
    return gw.deployment.path / "policy" / "access.csv"


def audit_json(data_dir: Path, *args: str) -> list[dict]:
    result = run_cli(data_dir, "audit", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def sha256_files(data_dir: Path) -> dict[str, str]:
    return {name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest() for name in POLICY_FILES}


# --- (a) an edit takes effect within seconds ---------------------------------------------------------
def test_allowing_a_model_takes_effect_within_5_seconds(live):
    bob = live.deployment.tokens["bob"]
    denied = chat(live, bob, "gpt-4o")
    assert denied.status_code == 403
    assert "'acme' may not use model 'openai/gpt-4o'" in denied.json()["error"]["message"]

    with access_file(live).open("a") as fh:
        fh.write(BOB_GPT4O)
    elapsed = wait_for(lambda: chat(live, bob, "gpt-4o").status_code == 200, timeout=5, interval=0.1)
    assert elapsed < 5
    assert chat(live, bob, "gpt-4o-mini").status_code == 200
    assert chat(live, live.deployment.tokens["dana"], "gpt-4o").status_code == 403  # only bob was allowed

    # taking it away again works the same way, but a request in flight keeps the policy it started with
    with ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(chat, live, bob, "gpt-4o", **{"x-sim-latency-ms": "3500"})
        time.sleep(0.3)  # past the policy check, waiting for the provider
        access_file(live).write_text(access_file(live).read_text().replace(BOB_GPT4O, ""))
        assert wait_for(lambda: chat(live, bob, "gpt-4o").status_code == 403, timeout=5, interval=0.1) < 5
        assert not in_flight.done()
        assert in_flight.result().status_code == 200


# --- (b)+(c) a broken edit is refused whole, reported everywhere, then fixed -------------------------
def test_broken_edit_is_refused_whole_and_reported_then_fixed(live):
    data_dir = live.deployment.path
    bob = live.deployment.tokens["bob"]
    access = access_file(live)
    start_hashes = sha256_files(data_dir)
    initial = readyz(live).json()
    assert initial["checks"]["policy"] == "ok"

    # a valid edit first: its reload is audited with the files' hashes
    with access.open("a") as fh:
        fh.write(BOB_GPT4O)
    wait_for(lambda: chat(live, bob, "gpt-4o").status_code == 200, timeout=5)
    good_hashes = sha256_files(data_dir)
    good_version = readyz(live).json()["policy"]["version"]
    assert good_version != initial["policy"]["version"]

    # a broken edit: one bad effect, and a rule that would deny gpt-4o-mini to everyone in acme
    good_text = access.read_text()
    lines = good_text.splitlines()
    broken_text = good_text + "p, *, acme, openai/gpt-4o-mini, deny\np, carol@globex.com, globex, openai/*, permit\n"
    bad_line = len(lines) + 2
    access.write_text(broken_text)
    broken_hashes = sha256_files(data_dir)
    expected_error = f"policy/access.csv:{bad_line}: error: unknown effect 'permit': use allow or deny"

    wait_for(lambda: readyz(live).json()["checks"]["policy"] != "ok", timeout=5)
    ready = readyz(live)
    assert ready.status_code == 200  # the previous policy still serves: ready
    body = ready.json()
    assert body["status"] == "ready"
    assert body["checks"]["policy"] == f"last edit refused: {expected_error}"
    assert body["policy"]["version"] == good_version

    # the previous policy keeps serving: nothing of the broken file was applied
    for _ in range(5):
        assert chat(live, bob, "gpt-4o-mini").status_code == 200  # the new deny line is not in force
        assert chat(live, bob, "gpt-4o").status_code == 200  # the last valid edit still is
        assert chat(live, bob, "o3-mini").status_code == 403
    assert "policy edit refused" in live.log() and expected_error in live.log()

    # (c) fix the file: the reload succeeds, /readyz clears, the new rules apply
    fixed_text = good_text + "p, bob@acme.com, acme, openai/o3-mini, allow\n"
    access.write_text(fixed_text)
    wait_for(lambda: readyz(live).json()["checks"]["policy"] == "ok", timeout=5)
    assert chat(live, bob, "o3-mini").status_code == 200
    fixed_hashes = sha256_files(data_dir)
    fixed_version = readyz(live).json()["policy"]["version"]
    assert live.stop() == 0

    entries = audit_json(data_dir, "--action", "policy")
    assert [e["action"] for e in entries] == ["policy.reloaded", "policy.refused", "policy.reloaded"]
    reloaded, refused, reloaded_again = entries
    assert all(e["actor"] == "gateway" for e in entries)
    assert reloaded["details"]["files"] == good_hashes
    assert good_hashes["policy/access.csv"] == hashlib.sha256(good_text.encode()).hexdigest()
    assert good_hashes["policy/access.csv"] != start_hashes["policy/access.csv"]
    assert (reloaded["target"], reloaded["details"]["previous"]) == (good_version, initial["policy"]["version"])
    assert refused["details"]["errors"] == [expected_error]
    assert refused["details"]["files"] == broken_hashes
    assert broken_hashes["policy/access.csv"] == hashlib.sha256(broken_text.encode()).hexdigest()
    assert refused["target"] == good_version  # the version that stayed in force
    assert reloaded_again["details"]["files"] == fixed_hashes
    assert (reloaded_again["target"], reloaded_again["details"]["previous"]) == (fixed_version, good_version)
    assert run_cli(data_dir, "audit", "verify").returncode == 0


def test_reverting_a_refused_edit_clears_the_error(live):
    """Undoing a broken edit (restoring the exact previous bytes) leaves a valid set in force:
    `/readyz` must stop reporting the refused edit."""
    access = access_file(live)
    previous = access.read_bytes()
    access.write_bytes(previous + b"p, *, acme, openai/gpt-4o, maybe\n")
    wait_for(lambda: readyz(live).json()["checks"]["policy"].startswith("last edit refused"), timeout=5)
    access.write_bytes(previous)  # the editor's undo
    time.sleep(2.5)  # two watcher polls and more
    assert readyz(live).json()["checks"]["policy"] == "ok"


def test_broken_tenants_file_refuses_the_whole_set(live):
    """A problem in one file refuses the edits of every file saved with it."""
    data_dir = live.deployment.path
    bob = live.deployment.tokens["bob"]
    with (data_dir / "tenants.csv").open("a") as fh:
        fh.write("initech,Initech,zero,0\n")
    with access_file(live).open("a") as fh:
        fh.write(BOB_GPT4O)
    expected = "tenants.csv:4: error: markup_pct and byok_fee_pct must be numbers >= 0, e.g. 10 or 2.5"
    wait_for(lambda: "tenants.csv:4" in readyz(live).json()["checks"]["policy"], timeout=5)
    time.sleep(1.2)  # the watcher looks once more: still refused
    assert chat(live, bob, "gpt-4o").status_code == 403  # the valid access.csv edit is not applied alone
    assert chat(live, bob, "gpt-4o-mini").status_code == 200
    assert readyz(live).json()["checks"]["policy"] == f"last edit refused: {expected}"


# --- (d) reload under concurrent traffic --------------------------------------------------------------
class Traffic:
    """Worker threads sending requests through the OpenAI SDK until stopped; every outcome is kept."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.stop = threading.Event()
        self.results: list[tuple[str, float, str]] = []  # (who, time, "ok" or the error)
        self._lock = threading.Lock()

    def worker(self, who: str, token: str, model: str, **headers: str) -> None:
        client = openai.OpenAI(base_url=self.gw.url + "/openai/v1", api_key=token, max_retries=0, timeout=15,
                               default_headers=headers or None)
        while not self.stop.is_set():
            try:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": "ping"}])
                outcome = "ok"
            except openai.APIStatusError as exc:
                outcome = f"{exc.status_code}"
            except Exception as exc:  # connection errors and the like: a failure too
                outcome = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.results.append((who, time.monotonic(), outcome))
        client.close()

    def of(self, who: str) -> list[tuple[float, str]]:
        with self._lock:
            return [(t, o) for w, t, o in self.results if w == who]


def test_reload_under_concurrent_traffic_fails_no_request(live):
    """Five seconds of continuous SDK traffic while access.csv is rewritten four times (each version
    valid, only unrelated rules change): every request succeeds, slow in-flight ones included."""
    access = access_file(live)
    base = access.read_text()
    versions = [
        base + "p, *, globex, anthropic/claude-haiku-*, allow\n",
        base + "p, role:interns, acme, openai/o3-*, deny\np, *, globex, anthropic/*, allow\n",
        "# reordered and commented\n" + "\n".join(reversed(base.splitlines())) + "\n",
        base + "p, dana@acme.com, acme, gemini/*, allow\n",
    ]
    traffic = Traffic(live)
    tokens = live.deployment.tokens
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(traffic.worker, f"bob-{i}", tokens["bob"], "gpt-4o-mini") for i in range(3)]
        futures += [pool.submit(traffic.worker, "carol", tokens["carol"], "gpt-4o")]
        futures += [pool.submit(traffic.worker, "alice", tokens["alice"], "gpt-4o-mini")]
        # in flight across a reload: each answered after 1.5 s
        futures += [pool.submit(traffic.worker, f"slow-{i}", tokens["bob"], "gpt-4o-mini",
                                **{"x-sim-latency-ms": "1500"}) for i in range(2)]
        try:
            time.sleep(0.5)
            for text in versions:
                access.write_text(text)
                time.sleep(1.1)
        finally:
            traffic.stop.set()
        for future in futures:
            future.result()

    assert live.stop() == 0
    failures = [r for r in traffic.results if r[2] != "ok"]
    assert not failures, failures[:10]
    assert len(traffic.results) > 100
    assert len(traffic.of("slow-0")) >= 3
    reloads = audit_json(live.deployment.path, "--action", "policy.reloaded")
    assert len(reloads) == len(versions)  # every edit was applied, none refused
    assert not audit_json(live.deployment.path, "--action", "policy.refused")


def test_no_request_sees_a_half_applied_set(live):
    """A new tenant needs two files: tenants.csv and its rule in access.csv. Saved one after the
    other, the intermediate state (a rule for a tenant not yet in tenants.csv) is invalid and is
    refused; the new tenant is allowed only once both files are in, and the old tenants never
    notice anything."""
    data_dir = live.deployment.path
    initech = live.deployment.issue_token("erin", "initech", "erin@initech.com")
    traffic = Traffic(live)
    tokens = live.deployment.tokens
    tenants = data_dir / "tenants.csv"
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(traffic.worker, "bob", tokens["bob"], "gpt-4o-mini"),
                   pool.submit(traffic.worker, "carol", tokens["carol"], "gpt-4o"),
                   pool.submit(traffic.worker, "erin", initech, "gpt-4o-mini")]
        try:
            time.sleep(0.5)
            with access_file(live).open("a") as fh:  # first file: a rule for a tenant that does not exist yet
                fh.write("p, *, initech, openai/gpt-4o-mini, allow\n")
            wait_for(lambda: "initech" in readyz(live).json()["checks"]["policy"], timeout=5)
            time.sleep(0.5)
            both_written_at = time.monotonic()
            with tenants.open("a") as fh:  # second file: the tenant
                fh.write("initech,Initech LLC,5,0\n")
            wait_for(lambda: readyz(live).json()["checks"]["policy"] == "ok", timeout=5)
            wait_for(lambda: any(o == "ok" for _, o in traffic.of("erin")), timeout=5)
            time.sleep(1.0)
        finally:
            traffic.stop.set()
        for future in futures:
            future.result()

    assert [o for _, o in traffic.of("bob") if o != "ok"] == []
    assert [o for _, o in traffic.of("carol") if o != "ok"] == []
    erin = traffic.of("erin")
    assert {o for _, o in erin} == {"403", "ok"}
    first_ok = next(i for i, (_, o) in enumerate(erin) if o == "ok")
    assert all(o == "403" for _, o in erin[:first_ok])  # refused until the set was complete...
    assert all(o == "ok" for _, o in erin[first_ok:])  # ...and allowed ever after
    assert erin[first_ok][0] >= both_written_at
    assert live.stop() == 0
    actions = [e["action"] for e in audit_json(data_dir, "--action", "policy")]
    assert actions == ["policy.refused", "policy.reloaded"]


# --- (e) CLI changes to tokens and keys while the gateway runs ---------------------------------------
def test_token_revoked_with_the_cli_is_refused_on_the_next_request(live):
    data_dir = live.deployment.path
    created = run_cli(data_dir, "tokens", "create", "--tenant", "acme", "--user", "frank@acme.com", "--json")
    assert created.returncode == 0, created.stderr
    issued = json.loads(created.stdout)
    with httpx.Client() as client:
        assert chat(live, issued["token"], "gpt-4o-mini", client).status_code == 200
        assert run_cli(data_dir, "tokens", "revoke", issued["id"]).returncode == 0
        refused = chat(live, issued["token"], "gpt-4o-mini", client)
    assert refused.status_code == 401
    assert "Invalid, expired or revoked Tollway credential" in refused.json()["error"]["message"]
    assert chat(live, live.deployment.tokens["bob"], "gpt-4o-mini").status_code == 200


def test_key_revoked_with_the_cli_moves_the_route_to_the_next_key_of_its_pool(live):
    data_dir = live.deployment.path
    added = run_cli(data_dir, "keys", "add", "backup-openai", "--provider", "openai", "--operator",
                    stdin="sk-sim-openai-key-0001\n")
    assert added.returncode == 0, added.stderr
    routes = data_dir / "policy/routes.csv"
    routes.write_text(routes.read_text().replace("operator-openai", "operator-openai|backup-openai"))
    wait_for(lambda: len(audit_json(data_dir, "--action", "policy.reloaded")) == 1, timeout=5)
    assert run_cli(data_dir, "keys", "revoke", "operator-openai").returncode == 0
    assert chat(live, live.deployment.tokens["bob"], "gpt-4o-mini").status_code == 200
    assert live.stop() == 0
    events = live.deployment.events()
    assert events[-1]["key_id"] == "backup-openai"


def test_key_added_with_the_cli_is_noticed_and_makes_a_refused_edit_valid(live):
    """A route to a key that does not exist yet is refused; adding the key with the CLI while the
    gateway runs must be noticed within a few seconds (the set is validated again and swapped in)
    without anyone having to touch a policy file again."""
    data_dir = live.deployment.path
    carol = live.deployment.tokens["carol"]
    routes = data_dir / "policy/routes.csv"
    routes.write_text("p, globex, openai/*, globex-openai\n" + routes.read_text())
    wait_for(lambda: "globex-openai" in readyz(live).json()["checks"]["policy"], timeout=5)
    added = run_cli(data_dir, "keys", "add", "globex-openai", "--provider", "openai", "--tenant", "globex",
                    stdin="sk-sim-openai-key-0001\n")
    assert added.returncode == 0, added.stderr
    wait_for(lambda: readyz(live).json()["checks"]["policy"] == "ok", timeout=5)
    assert chat(live, carol, "gpt-4o").status_code == 200
    assert live.stop() == 0
    assert live.deployment.events()[-1]["billing_mode"] == "byok"
