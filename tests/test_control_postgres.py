"""The control store on PostgreSQL, against a real private cluster (tests/pg_server.py): every CLI command,
a real `tollway serve` gateway with revocations reaching it within a second, PostgreSQL stopped and
restarted under a running gateway, `tollway control migrate` from a populated control.db, concurrent
writers keeping the audit chain, schema versions, and passwords never shown."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from proxy.control import ControlError, ControlStore, ControlUnavailable
from proxy.control.schema import SCHEMA_VERSION
from proxy.crypto import Keyring, load_master_key
from tests.helpers import REPO, SIM_KEYS, Deployment, GatewayProcess, refused_after, run_cli
from tests.pg_server import PgServer, unavailable_reason

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")]

#: A revoked token must be refused by every gateway within this long (the bound the spec sets).
PROPAGATION_BOUND_S = 1.0


@pytest.fixture(scope="module")
def pg():
    server = PgServer().start()
    yield server
    server.close()


class PgDeployment(Deployment):
    """A deployment whose tollway.toml names a fresh PostgreSQL database as its control store."""

    def __init__(self, path: Path, sim_url: str, url: str) -> None:
        self.url = url
        super().__init__(path, sim_url)
        (path / "control.db").unlink()  # `init` made one; this deployment must never touch it again

    def write_toml(self, extra: str = "", providers: dict[str, str] | None = None) -> None:
        super().write_toml(f'{extra}\n[control]\nurl = "{self.url}"\n', providers)

    def store(self) -> ControlStore:
        return ControlStore(self.url, Keyring(load_master_key(self.path)))


@pytest.fixture
def pg_deployment(tmp_path, simulator, pg) -> PgDeployment:
    dep = PgDeployment(tmp_path / "deploy", simulator.url, pg.create_database())
    dep.add_test_keys()
    dep.issue_token("alice", "acme", "alice@acme.com")
    dep.issue_token("carol", "globex", "carol@globex.com")
    return dep


def cli_ok(data_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    result = run_cli(data_dir, *args, stdin=stdin)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def chat(gw: GatewayProcess, token: str) -> int:
    """Status of one chat completion through the gateway with `token`."""
    client = openai.OpenAI(base_url=gw.url + "/openai/v1", api_key=token, max_retries=0, timeout=10)
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


def readyz(gw: GatewayProcess) -> dict:
    return httpx.get(gw.url + "/readyz", timeout=5).json()


# --- the CLI ------------------------------------------------------------------------------------
def test_every_cli_command_works_on_postgresql_and_never_prints_a_secret(pg_deployment):
    d, outputs = pg_deployment.path, []

    def ok(*args, stdin=None):
        result = cli_ok(d, *args, stdin=stdin)
        outputs.extend([result.stdout, result.stderr])
        return result

    first, second = "sk-proj-" + secrets.token_urlsafe(24), "sk-proj-" + secrets.token_urlsafe(24)
    added = json.loads(ok("keys", "add", "extra-openai", "--provider", "openai", "--operator", "--json",
                          stdin=first + "\n").stdout)
    assert (added["id"], added["fingerprint"]) == ("extra-openai", "…" + first[-4:])
    listed = {k["id"]: k for k in json.loads(ok("keys", "list", "--json").stdout)}
    assert set(listed) == {"extra-openai", "operator-openai", "operator-gemini", "operator-anthropic", "acme-anthropic"}
    rotated = json.loads(ok("keys", "rotate", "extra-openai", "--json", stdin=second + "\n").stdout)
    assert rotated["fingerprint"] == "…" + second[-4:]
    assert json.loads(ok("keys", "revoke", "extra-openai", "--json").stdout)["status"] == "revoked"

    token = json.loads(ok("tokens", "create", "--tenant", "acme", "--user", "zed@acme.com", "--role", "eng",
                          "--json").stdout)
    assert token["token"].startswith("tw_")
    assert json.loads(ok("tokens", "revoke", token["id"], "--json").stdout)["revoked_at"]
    assert token["id"] in {t["id"] for t in json.loads(ok("tokens", "list", "--json").stdout)}
    ok("credits", "add", "--tenant", "globex", "--amount", "123.45", "--note", "PO 7")
    assert [(c["tenant"], c["amount_usd"]) for c in json.loads(ok("credits", "list", "--json").stdout)] == [
        ("globex", "123.45")]
    explained = json.loads(ok("policy", "explain", "--tenant", "acme", "--user", "alice@acme.com",
                              "--model", "openai/gpt-4o-mini", "--json").stdout)
    assert (explained["decision"], explained["route"]["keys"][0]["key_id"], explained["billing_mode"]) == (
        "allow", "operator-openai", "unified")  # the key's owner read from PostgreSQL

    actions = [e["action"] for e in json.loads(ok("audit", "--json").stdout)]
    assert actions[-6:] == ["key.added", "key.rotated", "key.revoked", "token.issued", "token.revoked",
                            "credits.added"]
    assert json.loads(ok("audit", "verify", "--json").stdout)["ok"] is True
    status = json.loads(ok("control", "status", "--json").stdout)
    assert (status["backend"], status["schema_version"]) == ("postgresql", SCHEMA_VERSION)

    everything = "\n".join(outputs)
    assert first not in everything and second not in everything
    assert token["token"] not in "\n".join(outputs[2:]).replace(json.dumps(token, indent=2), "")
    assert not (d / "control.db").exists()  # nothing went to SQLite


def test_two_concurrent_writers_keep_the_audit_chain(pg_deployment):
    """Two processes appending at once (as two gateways and the CLI do): every entry links to the one before."""
    script = textwrap.dedent(f"""
        import sys, time
        from decimal import Decimal
        from proxy.control import ControlStore
        from proxy.crypto import Keyring, load_master_key
        from pathlib import Path
        store = ControlStore({pg_deployment.url!r}, Keyring(load_master_key(Path({str(pg_deployment.path)!r}))))
        time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
        for i in range(40):
            if i % 2:
                store.audit("test.write", sys.argv[2] + str(i), {{"i": i}})
            else:
                store.add_credits("acme", Decimal("0.01"), sys.argv[2])
        store.close()
    """)
    start_at = str(time.time() + 1.5)
    writers = [subprocess.Popen([sys.executable, "-c", script, start_at, name], cwd=REPO) for name in ("a", "b")]
    assert [w.wait(60) for w in writers] == [0, 0]
    verified = json.loads(cli_ok(pg_deployment.path, "audit", "verify", "--json").stdout)
    assert verified["ok"] is True, verified
    store = pg_deployment.store()
    try:
        assert len(store.audit_entries(action="test.write")) == 40
        assert sum(a for _, a, _, _ in store.list_credits()) == Decimal("0.40")
    finally:
        store.close()


def test_schema_version_recorded_and_a_newer_store_refused(pg_deployment):
    store = pg_deployment.store()
    try:
        assert store.schema_version() == SCHEMA_VERSION
        store.connection.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    finally:
        store.close()
    with pytest.raises(ControlError, match="newer than this Tollway .* upgrade Tollway"):
        pg_deployment.store()
    result = run_cli(pg_deployment.path, "keys", "list")
    assert result.returncode == 1 and "upgrade Tollway" in result.stderr


def test_a_control_db_from_before_versions_opens_as_version_1(tmp_path, simulator):
    dep = Deployment(tmp_path / "old", simulator.url)
    dep.add_test_keys()
    store = dep.store()
    store.connection.execute("DELETE FROM meta WHERE name = 'schema_version'")  # as every control.db was
    assert store.schema_version() == 1
    store.close()
    store = dep.store()
    try:
        assert store.schema_version() == 1 and len(store.list_keys()) == 4
        assert store.connection.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == ("1",)
    finally:
        store.close()


def test_a_password_in_the_url_is_never_shown(pg_deployment, pg):
    secret_password = "pw-" + secrets.token_hex(8)
    with_password = pg_deployment.url.replace("postgres@", f"postgres:{secret_password}@")  # trust: accepted
    pg_deployment.url = with_password
    pg_deployment.write_toml()
    status = cli_ok(pg_deployment.path, "control", "status")
    assert secret_password not in status.stdout + status.stderr and "postgres:***@" in status.stdout
    pg_deployment.url = with_password.replace(f":{pg.port}/", ":9/")  # nothing listens there
    pg_deployment.write_toml()
    refused = run_cli(pg_deployment.path, "keys", "list")
    assert refused.returncode == 1 and "PostgreSQL at postgresql://postgres:***@" in refused.stderr
    assert secret_password not in refused.stdout + refused.stderr


def test_dashboard_and_reports_read_the_postgresql_store(pg_deployment):
    from analytics.jobs import load_billing_inputs
    from dashboard.data import control_fingerprint, control_location, read_control

    target = control_location(pg_deployment.path)
    assert target == pg_deployment.url
    before = control_fingerprint(target)
    store = pg_deployment.store()
    store.add_credits("globex", Decimal("50"), "prepaid")
    store.close()
    assert control_fingerprint(target) != before
    snapshot = read_control(target)
    assert {k.key_id: k.billing_mode for k in snapshot.keys}["acme-anthropic"] == "byok"
    assert snapshot.credits.rows() == [("globex", "50", "prepaid", snapshot.credits["created_at"][0])]
    assert [(c.tenant, c.amount) for c in load_billing_inputs(pg_deployment.path).credits] == [
        ("globex", Decimal("50"))]


# --- a running gateway -----------------------------------------------------------------------------
def test_gateway_on_postgresql_serves_refuses_revoked_tokens_within_a_second_and_rides_out_an_outage(
        pg_deployment, pg):
    gw = GatewayProcess(pg_deployment).start()
    try:
        assert chat(gw, pg_deployment.tokens["alice"]) == 200
        assert readyz(gw)["checks"]["control"] == "ok"

        # a token issued and then revoked by the CLI: working at once, refused within the bound
        issued = json.loads(cli_ok(pg_deployment.path, "tokens", "create", "--tenant", "acme", "--user",
                                   "eve@acme.com", "--json").stdout)
        deadline = time.monotonic() + PROPAGATION_BOUND_S
        while chat(gw, issued["token"]) != 200:
            assert time.monotonic() < deadline, "a new token did not reach the gateway within the bound"
        cli_ok(pg_deployment.path, "tokens", "revoke", issued["id"])
        assert refused_after(gw, issued["token"]) < PROPAGATION_BOUND_S * 0.5  # with margin

        # PostgreSQL stops: cached tokens still work, /readyz says why, the gateway stays ready
        pg.stop()
        assert chat(gw, pg_deployment.tokens["alice"]) == 200
        deadline = time.monotonic() + 10
        while (ready := readyz(gw))["checks"]["control"] == "ok":
            assert time.monotonic() < deadline, ready
            time.sleep(0.05)
        assert ready["checks"]["control"].startswith("unreachable, serving cached tokens and keys")
        assert ready["status"] == "ready"
        assert chat(gw, pg_deployment.tokens["carol"]) == 200

        # back: the listener reconnects on its own, and revocations propagate again
        pg.start()
        deadline = time.monotonic() + 15
        while readyz(gw)["checks"]["control"] != "ok":
            assert time.monotonic() < deadline, gw.log()[-3000:]
            time.sleep(0.05)
        store = pg_deployment.store()
        try:
            [carol] = [t for t in store.list_tokens() if t.user_id == "carol@globex.com"]
            store.revoke_token(carol.token_id)
        finally:
            store.close()
        assert refused_after(gw, pg_deployment.tokens["carol"]) < PROPAGATION_BOUND_S
        assert chat(gw, pg_deployment.tokens["alice"]) == 200
    finally:
        if pg.pid is None:
            pg.start()
        assert gw.stop() == 0, gw.log()[-3000:]
    assert "Traceback" not in gw.log()


# --- control migrate ----------------------------------------------------------------------------
def test_control_migrate_copies_and_verifies_a_populated_control_db_and_the_gateway_runs_on_it(
        tmp_path, simulator, pg):
    dep = Deployment(tmp_path / "deploy", simulator.url)
    dep.add_test_keys()
    dep.issue_token("alice", "acme", "alice@acme.com")
    revoked = dep.issue_token("gone", "acme", "gone@acme.com")
    store = dep.store()
    try:
        store.revoke_token(next(t.token_id for t in store.list_tokens() if t.user_id == "gone@acme.com"))
        store.add_credits("globex", Decimal("99.99"), "prepaid")
        store.add_object(("openai", "file-abc", "file", "acme", None, "operator-openai", "2026-11-01T00:00:00Z"))
        store.claim_results("openai", "batch_1")
        store.close_period("2026-10", [{"tenant": "acme", "charges_usd": "12.5"}])
        counts = {t: store.count(t) for t in ("provider_keys", "client_tokens", "credits", "audit_log")}
    finally:
        store.close()
    url = pg.create_database()

    result = cli_ok(dep.path, "control", "migrate", "--to", url, "--json")
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["audit_problems"] == []
    assert all(t["source"] == t["target"] for t in report["tables"].values())
    assert {t: report["tables"][t]["target"] for t in counts} == counts
    assert report["toml"] == f'[control]\nurl = "{url}"'
    again = run_cli(dep.path, "control", "migrate", "--to", url)
    assert again.returncode == 1 and "already holds a control store" in again.stderr

    with (dep.path / "tollway.toml").open("a") as toml:
        toml.write(f'\n[control]\nurl = "{url}"\n')
    assert json.loads(cli_ok(dep.path, "audit", "verify", "--json").stdout)["ok"] is True
    gw = GatewayProcess(dep).start()
    try:
        assert chat(gw, dep.tokens["alice"]) == 200
        assert chat(gw, revoked) == 401
        added = cli_ok(dep.path, "credits", "add", "--tenant", "acme", "--amount", "1")  # ids continue after the copy
        assert added.returncode == 0
    finally:
        assert gw.stop() == 0
    store = ControlStore(url, Keyring(load_master_key(dep.path)))
    try:
        assert store.find_object("openai", "file-abc")[3] == "acme"
        assert store.claim_results("openai", "batch_1") is False
        assert store.list_keys(with_secrets=True)[0].secret.reveal() in SIM_KEYS.values()
        assert json.loads(store.closed_statements()[0][2])["charges_usd"] == "12.5"
    finally:
        store.close()


def test_an_unreachable_postgresql_at_start_is_a_clear_error(tmp_path, simulator, pg):
    dep = PgDeployment(tmp_path / "deploy", simulator.url, pg.url("tw_nothing").replace(f":{pg.port}/", ":9/"))
    with pytest.raises(ControlUnavailable, match="PostgreSQL at postgresql://postgres@127.0.0.1:9/"):
        dep.store()
    result = run_cli(dep.path, "serve")
    assert result.returncode == 1 and "start PostgreSQL" in result.stderr


# --- token exchange on PostgreSQL: issued by one gateway, accepted by another ---------------------------
def test_a_token_exchanged_at_one_gateway_is_accepted_by_another_within_a_second(pg_deployment, tmp_path):
    from tests.test_identity import ACCESS, IDENTITIES, auth_toml, claude, exchange, k8s_token
    from tests.test_jwt import Idp, ec_key, rsa_key

    idps = {"sso": Idp().start(), "github": Idp().start(), "k8s": Idp().start()}
    idps["sso"].add("sso-1", rsa_key())
    idps["github"].add("gh-1", rsa_key())
    idps["k8s"].add("k8s-1", ec_key())
    (pg_deployment.path / "policy" / "access.csv").write_text(ACCESS)
    (pg_deployment.path / "policy" / "identities.csv").write_text(IDENTITIES)
    pg_deployment.write_toml(auth_toml(idps))
    twin = pg_deployment.twin(tmp_path / "twin")
    twin.write_toml(auth_toml(idps))
    a, b = GatewayProcess(pg_deployment).start(), GatewayProcess(twin).start()
    try:
        answer = exchange(a.url, k8s_token(idps))
        assert answer.status_code == 200, answer.text
        token = answer.json()["token"]
        assert claude(a.url, token).content[0].text, "the issuing gateway knows the token at once"
        started = time.monotonic()
        while True:
            try:
                assert claude(b.url, token).content[0].text
                break
            except Exception:
                if time.monotonic() - started > PROPAGATION_BOUND_S:
                    raise
                time.sleep(0.02)
        assert [t["user"] for t in json.loads(cli_ok(pg_deployment.path, "tokens", "list", "--json").stdout)
                if t["id"] == answer.json()["id"]] == ["svc:billing"], "stored in PostgreSQL, hashed"
    finally:
        for gw in (a, b):
            gw.stop()
        for idp in idps.values():
            idp.stop()
