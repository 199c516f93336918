"""The real `tollway` command in a subprocess: init (samples, `--simulated`), keys, tokens, the audit
log, the master key, `policy check` and `serve` refusing a broken policy, a port in use or a second
gateway on one directory, `tollway simulator`, and every command on a directory with no deployment."""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from proxy.control import GENESIS_HASH, audit_hash
from proxy.demo import wait_healthy
from proxy.settings import load_settings
from tests.helpers import REPO, Deployment, GatewayProcess, free_port, run_cli

SAMPLES = ("tollway.toml", "tenants.csv", "pricing.csv", "policy/model.conf", "policy/access.csv",
           "policy/routes.csv", "policy/limits.csv",
           "policy/operations.csv", "policy/identities.csv")


class Cli:
    """Runs `tollway` on one deployment and keeps every output, to search them for secrets."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.outputs: list[str] = []

    def __call__(self, *args: str, stdin: str | None = None, env: dict | None = None,
                 data_dir: Path | None | bool = True) -> subprocess.CompletedProcess:
        target = self.data_dir if data_dir is True else (data_dir or None)
        result = run_cli(target, *args, stdin=stdin, env=env)
        self.outputs += [result.stdout, result.stderr]
        return result

    def ok(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        result = self(*args, **kwargs)
        assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    def json(self, *args: str, **kwargs):
        return json.loads(self.ok(*args, "--json", **kwargs).stdout)

    def all_output(self) -> str:
        return "\n".join(self.outputs)


def provider_secret(tail: str = "") -> str:
    return "sk-proj-" + secrets.token_urlsafe(30) + tail


def stored_bytes(data_dir: Path) -> dict[str, bytes]:
    """Every file of the deployment (control.db and its -wal/-shm included)."""
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}


def audit_rows(data_dir: Path) -> list[dict]:
    con = sqlite3.connect(data_dir / "control.db")
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM audit_log ORDER BY seq")]
    finally:
        con.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def key_ids(data_dir: Path) -> list[str]:
    con = sqlite3.connect(data_dir / "control.db")
    try:
        return [r[0] for r in con.execute("SELECT key_id FROM provider_keys ORDER BY key_id")]
    finally:
        con.close()


def token_count(data_dir: Path) -> int:
    con = sqlite3.connect(data_dir / "control.db")
    try:
        return con.execute("SELECT count(*) FROM client_tokens").fetchone()[0]
    finally:
        con.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One deployment made by the real `tollway init`, copied for each test (keeps the suite fast)."""
    data_dir = tmp_path_factory.mktemp("template") / "deploy"
    result = run_cli(None, "init", str(data_dir))
    assert result.returncode == 0, result.stderr
    return data_dir


@pytest.fixture
def cli(tmp_path, template) -> Cli:
    data_dir = tmp_path / "deploy"
    shutil.copytree(template, data_dir)
    toml = data_dir / "tollway.toml"
    toml.write_text(toml.read_text().replace("port = 8080", f"port = {free_port()}"))
    return Cli(data_dir)


# --- init ---------------------------------------------------------------------------------------------
def test_init_creates_samples_master_key_and_control_db(tmp_path):
    target = tmp_path / "fresh" / "deploy"
    result = run_cli(None, "init", str(target), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert Path(doc["data_dir"]) == target.resolve()
    assert sorted(doc["written"]) == sorted(SAMPLES)
    assert Path(doc["master_key_file"]) == (target / "master.key").resolve()
    assert result.stderr.strip()  # the human messages go to stderr
    for name in SAMPLES:
        assert (target / name).is_file(), name
    assert (target / "policy" / "access.csv").read_text() == (
        Path(__file__).resolve().parent.parent / "data" / "policy" / "access.csv").read_text()
    key = base64.b64decode((target / "master.key").read_text().strip(), validate=True)
    assert len(key) == 32
    assert mode(target / "master.key") == 0o600
    assert mode(target / "control.db") == 0o600
    for extra in ("control.db-wal", "control.db-shm"):
        if (target / extra).exists():
            assert mode(target / extra) & 0o077 == 0, extra
    tables = {r[0] for r in sqlite3.connect(target / "control.db").execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"provider_keys", "client_tokens", "audit_log"} <= tables


def test_init_with_data_dir_flag(tmp_path):
    target = tmp_path / "viaflag"
    result = run_cli(target, "init")
    assert result.returncode == 0, result.stderr
    assert (target / "master.key").exists() and (target / "control.db").exists()


def test_init_again_keeps_existing_files_and_the_master_key(cli):
    d = cli.data_dir
    key_before = (d / "master.key").read_bytes()
    (d / "policy" / "access.csv").write_text("# edited by the governance lead\n")
    cli.ok("keys", "add", "k1", "--provider", "openai", "--operator", stdin=provider_secret() + "\n")
    doc = cli.json("init", str(d), data_dir=None)
    assert doc["written"] == []
    assert (d / "master.key").read_bytes() == key_before
    assert (d / "policy" / "access.csv").read_text() == "# edited by the governance lead\n"
    assert [k["id"] for k in cli.json("keys", "list")] == ["k1"]


def test_init_names_the_keys_the_sample_routes_need(tmp_path):
    target = tmp_path / "deploy"
    result = run_cli(None, "init", str(target))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[1:] == [
        "next: add the keys policy/routes.csv names (the gateway starts once they exist; the key on stdin):",
        f'  echo "$KEY" | tollway --data-dir {target} keys add acme-anthropic --provider anthropic --tenant acme',
        f'  echo "$KEY" | tollway --data-dir {target} keys add operator-openai --provider openai --operator']


@pytest.mark.parametrize("flags, url", [(["--simulated"], "http://127.0.0.1:9090"),
                                        (["--simulated", "--simulator-url", "http://127.0.0.1:9191/"],
                                         "http://127.0.0.1:9191"),
                                        (["--simulator-url", "http://localhost:9191"], "http://localhost:9191")],
                         ids=["default", "url", "url-alone"])
def test_init_simulated_points_every_builtin_provider_at_the_simulator(tmp_path, flags, url):
    target = tmp_path / "deploy"
    result = run_cli(None, "init", str(target), *flags, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["simulator_url"], sorted(doc["written"])) == (url, sorted(SAMPLES))
    providers = load_settings(target).providers
    assert {name: p.base_url for name, p in providers.items()} == {
        "openai": f"{url}/openai", "anthropic": f"{url}/anthropic", "gemini": f"{url}/gemini"}
    port = url.rsplit(":", 1)[1]
    assert ("providers point at the simulated provider on " + url + ": start it with `tollway simulator"
            + ("" if port == "9090" else f" --port {port}") + "` (it accepts any provider key)") in result.stderr
    text = (target / "tollway.toml").read_text()
    assert 'base_url = "' + url + '/openai"  # `tollway simulator`; for real calls: https://api.openai.com' in text
    assert text.replace(url, "X") == (REPO / "data" / "tollway.toml").read_text().replace(
        'base_url = "https://api.openai.com"',
        'base_url = "X/openai"  # `tollway simulator`; for real calls: https://api.openai.com').replace(
        'base_url = "https://api.anthropic.com"',
        'base_url = "X/anthropic"  # `tollway simulator`; for real calls: https://api.anthropic.com').replace(
        'base_url = "https://generativelanguage.googleapis.com"',
        'base_url = "X/gemini"  # `tollway simulator`; for real calls: https://generativelanguage.googleapis.com')


def test_init_simulated_keeps_an_existing_tollway_toml_and_says_so(cli):
    before = (cli.data_dir / "tollway.toml").read_text()
    result = cli.ok("init", str(cli.data_dir), "--simulated", data_dir=None)
    assert (cli.data_dir / "tollway.toml").read_text() == before
    assert (f"warning: {cli.data_dir / 'tollway.toml'} already existed and was kept: point its [providers.*] "
            "base_url at http://127.0.0.1:9090/openai, /anthropic and /gemini yourself, or delete it and run this "
            "again") in result.stderr


@pytest.mark.parametrize("url", ["127.0.0.1:9090", "ftp://127.0.0.1:9090", "http://127.0.0.1:9090/sim"])
def test_init_refuses_a_simulator_url_that_is_not_one(tmp_path, url):
    result = run_cli(None, "init", str(tmp_path / "deploy"), "--simulated", "--simulator-url", url)
    assert result.returncode == 2
    assert f"{url!r}: give the simulator's URL, e.g. http://127.0.0.1:9090" in result.stderr
    assert not (tmp_path / "deploy").exists()


# --- keys -----------------------------------------------------------------------------------------------
def test_keys_add_and_list_never_show_the_key(cli):
    d = cli.data_dir
    openai_key, anthropic_key = provider_secret("WXYZ"), provider_secret("ab12")
    reader = sqlite3.connect(d / "control.db")  # an open reader keeps the -wal file around for inspection
    reader.execute("SELECT count(*) FROM provider_keys").fetchone()
    try:
        added = cli.json("keys", "add", "operator-openai", "--provider", "openai", "--operator", stdin=openai_key + "\n")
        assert added["id"] == "operator-openai"
        assert added["provider"] == "openai"
        assert added["owner"] == "operator"
        assert added["status"] == "active"
        assert added["fingerprint"].endswith("WXYZ")
        cli.ok("keys", "add", "acme-anthropic", "--provider", "anthropic", "--tenant", "acme", stdin=anthropic_key)

        listed = cli.json("keys", "list")
        assert [(k["id"], k["provider"], k["owner"], k["status"]) for k in listed] == [
            ("acme-anthropic", "anthropic", "acme", "active"), ("operator-openai", "openai", "operator", "active")]
        for entry, secret in zip(listed, (anthropic_key, openai_key), strict=True):
            assert entry["fingerprint"].endswith(secret[-4:])
            assert secret[:-4] not in json.dumps(entry, ensure_ascii=False)
            assert not any(len(str(v)) >= 12 and str(v) in secret for v in entry.values())
        human = cli.ok("keys", "list").stdout
        assert "operator-openai" in human and "acme-anthropic" in human and "WXYZ" in human

        files = stored_bytes(d)
        assert "control.db" in files and "control.db-wal" in files
        for name, content in files.items():
            for secret in (openai_key, anthropic_key):
                assert secret.encode() not in content, f"provider key in plaintext in {name}"
                assert secret[:-4].encode() not in content, f"provider key in plaintext in {name}"
    finally:
        reader.close()
    for secret in (openai_key, anthropic_key):
        assert secret not in cli.all_output()
        assert secret[:-4] not in cli.all_output()


def test_keys_rotate_changes_the_fingerprint(cli):
    old, new = provider_secret("0ld1"), provider_secret("n3w2")
    cli.ok("keys", "add", "k1", "--provider", "gemini", "--operator", stdin=old)
    rotated = cli.json("keys", "rotate", "k1", stdin=new + "\n")
    assert rotated["id"] == "k1"
    assert rotated["fingerprint"].endswith("n3w2")
    assert rotated["status"] == "active"
    [listed] = cli.json("keys", "list")
    assert listed["fingerprint"].endswith("n3w2")
    for content in stored_bytes(cli.data_dir).values():
        assert old.encode() not in content and new.encode() not in content
    assert old not in cli.all_output() and new not in cli.all_output()


def test_keys_revoke_sets_status_revoked(cli):
    cli.ok("keys", "add", "k1", "--provider", "openai", "--operator", stdin=provider_secret())
    cli.ok("keys", "add", "k2", "--provider", "openai", "--operator", stdin=provider_secret())
    revoked = cli.json("keys", "revoke", "k1")
    assert (revoked["id"], revoked["status"]) == ("k1", "revoked")
    assert {k["id"]: k["status"] for k in cli.json("keys", "list")} == {"k1": "revoked", "k2": "active"}


def test_keys_list_on_an_empty_store(cli):
    assert cli.json("keys", "list") == []


def test_keys_add_unknown_provider_is_refused(cli):
    result = cli("keys", "add", "k1", "--provider", "openia", "--operator", stdin=provider_secret())
    assert result.returncode == 1
    assert "openia" in result.stderr and "unknown provider" in result.stderr
    assert "openai" in result.stderr  # the known ones are listed
    assert result.stdout == ""
    assert key_ids(cli.data_dir) == []


def test_keys_add_provider_declared_in_toml_is_accepted(cli):
    toml = cli.data_dir / "tollway.toml"
    toml.write_text(toml.read_text() + '\n[providers.groq]\nbase_url = "https://api.groq.com/openai"\n')
    cli.ok("keys", "add", "groq-1", "--provider", "groq", "--operator", stdin=provider_secret())
    assert cli.json("keys", "list")[0]["provider"] == "groq"


@pytest.mark.parametrize("stdin", ["", "\n", "   \n", "\n" + "sk-on-the-second-line-1234\n"])
def test_keys_add_empty_stdin_is_refused(cli, stdin):
    result = cli("keys", "add", "k1", "--provider", "openai", "--operator", stdin=stdin)
    assert result.returncode == 1
    assert "stdin" in result.stderr
    assert key_ids(cli.data_dir) == []


def test_keys_rotate_empty_stdin_is_refused(cli):
    cli.ok("keys", "add", "k1", "--provider", "openai", "--operator", stdin=provider_secret("AAAA"))
    result = cli("keys", "rotate", "k1", stdin="")
    assert result.returncode == 1
    assert cli.json("keys", "list")[0]["fingerprint"].endswith("AAAA")


def test_keys_add_duplicate_id_is_refused(cli):
    first, second = provider_secret("1111"), provider_secret("2222")
    cli.ok("keys", "add", "k1", "--provider", "openai", "--operator", stdin=first)
    result = cli("keys", "add", "k1", "--provider", "anthropic", "--tenant", "acme", stdin=second)
    assert result.returncode == 1
    assert "k1" in result.stderr and "exists" in result.stderr
    [key] = cli.json("keys", "list")
    assert (key["provider"], key["owner"]) == ("openai", "operator")
    assert key["fingerprint"].endswith("1111")
    assert second not in cli.all_output()


@pytest.mark.parametrize("owner", [["--tenant", "acme", "--operator"], []], ids=["both", "neither"])
def test_keys_add_owner_flags_are_a_usage_error(cli, owner):
    result = cli("keys", "add", "k1", "--provider", "openai", *owner, stdin=provider_secret())
    assert result.returncode == 2
    assert "usage" in result.stderr.lower()
    assert key_ids(cli.data_dir) == []


@pytest.mark.parametrize("key_id", ["bad id", "a/b", "", "ключ"])
def test_keys_add_invalid_id_is_refused(cli, key_id):
    result = cli("keys", "add", key_id, "--provider", "openai", "--operator", stdin=provider_secret())
    assert result.returncode == 1
    assert "key id" in result.stderr


@pytest.mark.parametrize("action", ["rotate", "revoke"])
def test_keys_unknown_id_is_refused(cli, action):
    result = cli("keys", action, "nope", stdin=provider_secret())
    assert result.returncode == 1
    assert "nope" in result.stderr


NEEDS_A_DEPLOYMENT = [("keys", "list"), ("tokens", "list"), ("credits", "list"), ("audit",), ("audit", "verify"),
                      ("pricing", "check"), ("policy", "check"), ("report", "run"), ("serve",),
                      ("policy", "explain", "--tenant", "acme", "--user", "bob@acme.com", "--model",
                       "openai/gpt-4o-mini")]


@pytest.mark.parametrize("args", NEEDS_A_DEPLOYMENT, ids=" ".join)
def test_every_command_on_a_missing_directory_says_so_and_names_init(tmp_path, args):
    missing = tmp_path / "nope"
    result = run_cli(missing, *args)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"error: no deployment at {missing} (no such directory): run `tollway init {missing}` first\n"
    assert not missing.exists()


@pytest.mark.parametrize("args", [("keys", "list"), ("report", "run"), ("serve",)], ids=" ".join)
def test_a_directory_without_a_deployment_is_named_as_such(tmp_path, args):
    result = run_cli(tmp_path, *args)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"error: no deployment at {tmp_path}: run `tollway init {tmp_path}` first\n"


# --- tokens ---------------------------------------------------------------------------------------------
def test_tokens_create_json_prints_one_document(cli):
    before = datetime.now(UTC)
    result = cli.ok("tokens", "create", "--tenant", "acme", "--user", "alice@acme.com", "--role", "engineering",
                    "--role", "oncall", "--expires-in", "30d", "--json")
    doc = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert {"id", "token", "tenant", "user", "roles", "expires_at"} <= set(doc)
    assert doc["token"].startswith("tw_") and len(doc["token"]) > 30
    assert (doc["tenant"], doc["user"], doc["roles"]) == ("acme", "alice@acme.com", ["engineering", "oncall"])
    expires = datetime.fromisoformat(doc["expires_at"].replace("Z", "+00:00"))
    assert expires.tzinfo is not None
    assert before + timedelta(days=30) - timedelta(seconds=5) <= expires <= datetime.now(UTC) + timedelta(days=30, seconds=5)
    assert doc["id"] in result.stderr  # messages on stderr...
    assert doc["token"] not in result.stderr  # ...but never the token

    token = doc["token"]
    for name, content in stored_bytes(cli.data_dir).items():
        assert token.encode() not in content, f"client token in plaintext in {name}"
        assert token[3:].encode() not in content, f"client token in plaintext in {name}"
    listed = cli.json("tokens", "list")
    assert [t["id"] for t in listed] == [doc["id"]]
    assert "token" not in listed[0]
    assert token not in cli.ok("tokens", "list").stdout
    assert token not in json.dumps(listed)
    assert listed[0]["roles"] == ["engineering", "oncall"]
    assert listed[0]["expires_at"] == doc["expires_at"]


def test_tokens_create_human_prints_only_the_token(cli):
    result = cli.ok("tokens", "create", "--tenant", "acme", "--user", "bob@acme.com")
    assert result.stdout.strip().startswith("tw_")
    assert len(result.stdout.strip().splitlines()) == 1
    [listed] = cli.json("tokens", "list")
    assert listed["expires_at"] is None and listed["revoked_at"] is None and listed["roles"] == []


def test_tokens_create_for_a_tenant_missing_from_tenants_csv_warns_that_the_gateway_refuses_it(cli):
    result = cli.ok("tokens", "create", "--tenant", "initech", "--user", "eve@initech.com")
    assert result.stdout.strip().startswith("tw_")
    assert ("warning: tenant 'initech' is not in tenants.csv: the gateway refuses this token "
            "(403 unknown_tenant) until it is added there") in result.stderr
    assert "warning" not in cli.ok("tokens", "create", "--tenant", "acme", "--user", "bob@acme.com").stderr


def test_two_tokens_differ(cli):
    a = cli.json("tokens", "create", "--tenant", "acme", "--user", "u1")
    b = cli.json("tokens", "create", "--tenant", "acme", "--user", "u1")
    assert a["token"] != b["token"] and a["id"] != b["id"]


def test_tokens_revoke_marks_it_revoked(cli):
    keep = cli.json("tokens", "create", "--tenant", "acme", "--user", "u1")
    gone = cli.json("tokens", "create", "--tenant", "globex", "--user", "u2")
    revoked = cli.json("tokens", "revoke", gone["id"])
    assert revoked["id"] == gone["id"]
    assert revoked["revoked_at"]
    by_id = {t["id"]: t for t in cli.json("tokens", "list")}
    assert by_id[gone["id"]]["revoked_at"] == revoked["revoked_at"]
    assert by_id[keep["id"]]["revoked_at"] is None
    assert "revoked" in cli.ok("tokens", "list").stdout


def test_tokens_revoke_unknown_id_is_refused(cli):
    result = cli("tokens", "revoke", "tok_nope")
    assert result.returncode == 1
    assert "tok_nope" in result.stderr


@pytest.mark.parametrize("expires_in", ["30x", "thirty", "-5d", "30", "d30", "1.5d", "30 days"])
def test_tokens_create_bad_expires_in_is_refused(cli, expires_in):
    result = cli("tokens", "create", "--tenant", "acme", "--user", "u1", f"--expires-in={expires_in}", "--json")
    assert result.returncode == 1
    assert "expires-in" in result.stderr
    assert result.stdout == ""
    assert token_count(cli.data_dir) == 0


@pytest.mark.parametrize("expires_in, delta", [("12h", timedelta(hours=12)), ("90m", timedelta(minutes=90)),
                                               ("2w", timedelta(weeks=2)), ("45s", timedelta(seconds=45))])
def test_tokens_create_expiry_units(cli, expires_in, delta):
    doc = cli.json("tokens", "create", "--tenant", "acme", "--user", "u1", "--expires-in", expires_in)
    expires = datetime.fromisoformat(doc["expires_at"].replace("Z", "+00:00"))
    assert abs(expires - (datetime.now(UTC) + delta)) < timedelta(seconds=10)


@pytest.mark.parametrize("args", [["--tenant", "ac me", "--user", "u1"], ["--tenant", "acme", "--user", " "],
                                  ["--tenant", "acme", "--user", "u1", "--role", "role:engineering"]])
def test_tokens_create_bad_input_is_refused(cli, args):
    result = cli("tokens", "create", *args)
    assert result.returncode == 1
    assert result.stderr.startswith("error:")
    assert token_count(cli.data_dir) == 0


@pytest.mark.parametrize("args", [["--user", "u1"], ["--tenant", "acme"]])
def test_tokens_create_missing_flag_is_a_usage_error(cli, args):
    assert cli("tokens", "create", *args).returncode == 2


# --- the audit log --------------------------------------------------------------------------------------
def test_every_admin_action_is_in_the_hash_chained_audit_log(cli):
    d = cli.data_dir
    secret_a, secret_b = provider_secret(), provider_secret()
    cli.ok("keys", "add", "k1", "--provider", "openai", "--operator", stdin=secret_a)
    cli.ok("keys", "add", "k2", "--provider", "anthropic", "--tenant", "acme", stdin=secret_a + "x")
    cli("keys", "add", "k1", "--provider", "openai", "--operator", stdin=secret_b)  # refused: not audited
    cli.ok("keys", "rotate", "k1", stdin=secret_b)
    cli.ok("keys", "revoke", "k2")
    token = cli.json("tokens", "create", "--tenant", "acme", "--user", "alice@acme.com", "--role", "eng")
    cli.ok("tokens", "revoke", token["id"])
    cli("tokens", "create", "--tenant", "acme", "--user", "u", "--expires-in", "soon")  # refused: not audited

    rows = audit_rows(d)
    assert [(r["action"], r["target"]) for r in rows] == [
        ("key.added", "k1"), ("key.added", "k2"), ("key.rotated", "k1"), ("key.revoked", "k2"),
        ("token.issued", token["id"]), ("token.revoked", token["id"])]
    assert json.loads(rows[1]["details"]) == {"provider": "anthropic", "owner": "acme"}
    assert json.loads(rows[4]["details"])["tenant"] == "acme"

    previous = GENESIS_HASH
    for row in rows:
        assert row["prev_hash"] == previous, row
        assert len(row["hash"]) == 64 and int(row["hash"], 16) >= 0
        assert row["hash"] == audit_hash(row["prev_hash"], row["ts"], row["action"], row["actor"], row["target"],
                                         row["details"])
        assert datetime.fromisoformat(row["ts"].replace("Z", "+00:00")).tzinfo is not None
        previous = row["hash"]
    assert len({r["hash"] for r in rows}) == len(rows)
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)

    text = json.dumps(rows)
    for secret in (secret_a, secret_b, token["token"]):
        assert secret not in text

    assert cli("audit", "verify").returncode == 0
    con = sqlite3.connect(d / "control.db")
    con.execute("UPDATE audit_log SET details = ? WHERE seq = ?", ('{"provider":"gemini","owner":"acme"}',
                                                                    rows[1]["seq"]))
    con.commit()
    con.close()
    assert cli("audit", "verify").returncode == 1


# --- the master key -------------------------------------------------------------------------------------
def test_malformed_master_key_env_is_refused_clearly(cli):
    result = cli("keys", "list", env={"TOLLWAY_MASTER_KEY": "not base64 at all!"})
    assert result.returncode == 1
    assert "TOLLWAY_MASTER_KEY" in result.stderr and "base64" in result.stderr
    assert "Traceback" not in result.stderr


def test_short_master_key_env_is_refused_clearly(cli):
    short = base64.b64encode(b"\x01" * 16).decode()
    result = cli("keys", "list", env={"TOLLWAY_MASTER_KEY": short})
    assert result.returncode == 1
    assert "TOLLWAY_MASTER_KEY" in result.stderr and "32 bytes" in result.stderr


def test_master_key_env_overrides_the_file(cli):
    """A wrong key in the env wins over a right `master.key`, and is refused before anything uses it."""
    cli.ok("keys", "add", "operator-openai", "--provider", "openai", "--operator", stdin=provider_secret())
    wrong = base64.b64encode(secrets.token_bytes(32)).decode()
    for args in (("serve",), ("keys", "list"), ("tokens", "create", "--tenant", "acme", "--user", "x")):
        result = cli(*args, env={"TOLLWAY_MASTER_KEY": wrong})
        assert result.returncode == 1, args
        assert "master key does not match this control.db" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert wrong not in result.stderr


def test_master_key_env_replaces_a_missing_file(cli):
    d = cli.data_dir
    encoded = (d / "master.key").read_text().strip()
    (d / "master.key").unlink()
    result = cli("keys", "list")
    assert result.returncode == 1
    assert "TOLLWAY_MASTER_KEY" in result.stderr
    env = {"TOLLWAY_MASTER_KEY": encoded}
    cli.ok("keys", "add", "k1", "--provider", "openai", "--operator", stdin=provider_secret(), env=env)
    assert [k["id"] for k in cli.json("keys", "list", env=env)] == ["k1"]
    # the same key through the env decrypts what was stored: `serve` gets past the keys to the policy check
    with (d / "policy" / "access.csv").open("a") as fh:
        fh.write("p, *, acme, openai/*, maybe\n")
    result = cli("serve", env=env)
    assert result.returncode == 1
    assert "does not decrypt" not in result.stderr
    assert "policy/access.csv" in result.stderr


# --- policy check and serve -----------------------------------------------------------------------------
def add_keys_the_sample_routes_name(cli: Cli) -> None:
    """What the operator does after `init`: add the keys that routes.csv names."""
    for line in (cli.data_dir / "policy" / "routes.csv").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        _, tenant, glob, pool = (f.strip() for f in line.split(","))
        for key_id in pool.split("|"):
            owner = ["--operator"] if tenant == "*" else ["--tenant", tenant]
            cli.ok("keys", "add", key_id.strip(), "--provider", glob.split("/")[0], *owner, stdin=provider_secret())


def test_policy_check_on_the_samples(cli):
    add_keys_the_sample_routes_name(cli)
    result = cli("policy", "check")
    assert result.returncode == 0, result.stderr
    assert "0 error" in result.stderr


def broken_access(data_dir: Path) -> int:
    """Append a bad rule to access.csv; return its line number."""
    path = data_dir / "policy" / "access.csv"
    lines = path.read_text().splitlines()
    lines.append("p, role:engineering, acme, anthropic/claude-*, permit")
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def test_policy_check_reports_file_and_line(cli):
    add_keys_the_sample_routes_name(cli)
    line = broken_access(cli.data_dir)
    result = cli("policy", "check")
    assert result.returncode == 1
    assert f"policy/access.csv:{line}:" in result.stderr
    assert "permit" in result.stderr


def test_policy_check_reports_a_bad_tenant_in_routes(cli):
    path = cli.data_dir / "policy" / "routes.csv"
    lines = path.read_text().splitlines() + ["p, umbrella, openai/*, operator-openai"]
    path.write_text("\n".join(lines) + "\n")
    result = cli("policy", "check")
    assert result.returncode == 1
    assert f"policy/routes.csv:{len(lines)}:" in result.stderr and "umbrella" in result.stderr


def test_serve_refuses_an_invalid_policy_and_exits(cli):
    line = broken_access(cli.data_dir)
    result = cli("serve")  # must exit by itself, well within the runner's timeout
    assert result.returncode == 1
    assert f"policy/access.csv:{line}" in result.stderr
    assert "permit" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_broken_tollway_toml(cli):
    toml = cli.data_dir / "tollway.toml"
    toml.write_text(toml.read_text() + "\n[server\n")
    result = cli("serve")
    assert result.returncode == 1
    assert "tollway.toml" in result.stderr


@pytest.mark.parametrize("section, words", [
    ('[metering]\nunpriced = "ignore"\n', "unpriced must be one of refuse, allow"),
    ('[metering]\non_client_disconnect = "wait"\n', "on_client_disconnect must be one of close, drain"),
    ('[metering]\nmax_output_tokens = "lots"\n', "max_output_tokens must be a whole number"),
    ('[metering]\nunpriced_models = "allow"\n', "unknown key(s) ['unpriced_models']"),
    ('[providers.azure]\nbase_url = "http://127.0.0.1:9"\nstyle = "azure"\ndeployments = "prod-4o"\n',
     "deployments must be a table"),
    ('[providers.azure]\nbase_url = "http://127.0.0.1:9"\nstyle = "azure"\n[providers.azure.deployments]\nprod = 4\n',
     "each deployment names a model"),
])
def test_serve_refuses_bad_metering_settings_naming_the_key(cli, section, words):
    toml = cli.data_dir / "tollway.toml"
    toml.write_text(toml.read_text() + "\n" + section)
    result = cli("serve")
    assert result.returncode == 1 and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_a_port_in_use_says_so_and_exits_1(cli):
    add_keys_the_sample_routes_name(cli)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--port", str(port))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"error: port {port} on 127.0.0.1 is in use (by another program or another Tollway); "
                             "stop it or pass --port\n")  # and nothing said "serving" first


def test_a_second_gateway_on_one_directory_names_the_process_that_serves_it(tmp_path):
    deployment = Deployment(tmp_path / "deploy", "http://127.0.0.1:9")
    deployment.add_test_keys()
    gateway = GatewayProcess(deployment).start()
    try:
        result = run_cli(deployment.path, "serve", "--port", str(free_port()))
    finally:
        assert gateway.stop() == 0
    events = deployment.path / "events.duckdb"
    assert (result.returncode, result.stdout) == (1, "")
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {events} is held by process {gateway.proc.pid} (")
    assert f"-m proxy.cli --data-dir {deployment.path} serve" in line
    assert line.endswith("): another gateway serves this directory already; stop it first, or serve another "
                         "--data-dir")


def start_simulator(*args: str) -> tuple[subprocess.Popen, str]:
    """`tollway simulator` on a free port, once it answers; returns the process and its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "simulator", "--port", str(port), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(f"{url}/_sim/health", proc, "simulator", timeout=20)
    return proc, url


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_simulator_serves_the_three_providers_prints_its_toml_and_stops_cleanly(stop):
    proc, url = start_simulator()
    try:
        answers = [httpx.post(f"{url}/openai/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer any"}),
                   httpx.post(f"{url}/anthropic/v1/messages", headers={"x-api-key": "whatever-key"},
                              json={"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": CHAT["messages"]}),
                   httpx.post(f"{url}/gemini/v1beta/models/gemini-2.5-flash:generateContent",
                              headers={"x-goog-api-key": "k"}, json={"contents": [{"parts": [{"text": "Hi"}]}]})]
    finally:
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=20)
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert answers[0].json()["choices"][0]["message"]["content"].startswith("This is a simulated reply from gpt-4o-mini")
    assert proc.returncode == 0, err
    assert out == (f'[providers.openai]\nbase_url = "{url}/openai"\n[providers.anthropic]\nbase_url = '
                   f'"{url}/anthropic"\n[providers.gemini]\nbase_url = "{url}/gemini"\n')
    assert err.splitlines() == [
        f"simulated OpenAI, Anthropic and Gemini on {url} (no network; provider keys accepted: any key)",
        f"for a new deployment: `tollway init DIR --simulated --simulator-url {url}`; for an existing one, these "
        "lines in its tollway.toml:",
        "Ctrl-C stops it.",
        "simulator stopped"]


def test_simulator_with_a_key_accepts_only_that_key():
    proc, url = start_simulator("--key", "openai=sk-only-this")
    try:
        wrong, right = (httpx.post(f"{url}/openai/v1/chat/completions", json=CHAT,
                                   headers={"authorization": f"Bearer {key}"}) for key in ("sk-other", "sk-only-this"))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert (wrong.status_code, right.status_code, proc.returncode) == (401, 200, 0)
    assert "(no network; provider keys accepted: openai only 'sk-only-this')" in err


def test_simulator_on_a_port_in_use_says_so_and_exits_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = run_cli(None, "simulator", "--port", str(port))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"error: port {port} on 127.0.0.1 is in use (by another program or another Tollway); "
                             "stop it or pass --port\n")


# --- credits --------------------------------------------------------------------------------------------
def credits_listed(cli: Cli) -> list[tuple[str, str]]:
    return [(c["tenant"], c["amount_usd"]) for c in cli.json("credits", "list")]


@pytest.mark.parametrize(("amount", "reason"), [
    ("1e30", "--amount 1e30 is out of range"),
    ("1000000000.01", "--amount 1000000000.01 is out of range"),
    ("0", "--amount 0 is out of range"),
    ("-5", "--amount -5 is out of range"),
    ("NaN", "--amount 'NaN' is not a number"),
    ("Infinity", "--amount 'Infinity' is not a number"),
    ("sNaN", "--amount 'sNaN' is not a number"),
    ("lots", "--amount 'lots' is not a number"),
])
def test_credits_add_refuses_an_absurd_amount_saying_what_is_allowed(cli, amount, reason):
    result = cli("credits", "add", "--tenant", "acme", f"--amount={amount}")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"error: {reason}: a top-up in USD must be a number above 0 and at most 1000000000, "
                             "e.g. 250 or 99.50\n")
    assert credits_listed(cli) == []


def test_credits_add_accepts_the_largest_amount(cli):
    doc = cli.json("credits", "add", "--tenant", "acme", "--amount", "1000000000")
    assert (doc["tenant"], doc["amount_usd"]) == ("acme", "1000000000")
    cli.ok("credits", "add", "--tenant", "globex", "--amount", "0.01")
    assert credits_listed(cli) == [("acme", "1000000000"), ("globex", "0.01")]


def test_credits_add_keeps_refusing_fractions_of_a_cent_and_a_missing_amount(cli):
    result = cli("credits", "add", "--tenant", "acme", "--amount", "0.001")
    assert result.returncode == 1
    assert result.stderr == "error: --amount has more than two decimals: credits are whole cents\n"
    assert cli("credits", "add", "--tenant", "acme").returncode == 2  # a usage error
    assert credits_listed(cli) == []


def test_credits_add_says_what_it_added_on_stderr_and_prints_nothing_else(cli):
    first = cli.ok("credits", "add", "--tenant", "acme", "--amount", "250", "--note", "PO 42")
    assert first.stdout == ""
    assert first.stderr == ("added 250 USD of prepaid credits to acme (Acme Corp), note 'PO 42'; acme's top-ups now "
                            "total 250 USD (`tollway credits list` lists them)\n")
    cli.ok("credits", "add", "--tenant", "globex", "--amount", "5")
    second = cli("credits", "add", "--tenant", "acme", "--amount", "0.50", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == {"id": 3, "tenant": "acme", "amount_usd": "0.50", "note": None,
                                         "tenant_total_usd": "250.50"}
    assert second.stderr == ("added 0.50 USD of prepaid credits to acme (Acme Corp); acme's top-ups now total "
                             "250.50 USD (`tollway credits list` lists them)\n")
