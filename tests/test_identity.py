"""Identity for people and machines: several trusted issuers, policy/identities.csv, POST /auth/token.

Three identity providers run on loopback, each serving its own JWKS: the company's SSO (the old
`[auth.jwt]` table, tenant from the `org` claim), a CI issuer minting tokens shaped like GitHub
Actions OIDC tokens, and a cluster issuer minting Kubernetes service-account tokens (ES256). The
two machine issuers name no tenant: only policy/identities.csv maps their tokens. Requests go
through a real `tollway serve` with the official SDKs; expected identities and messages are
written out by hand from the files below.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import httpx
import jwt
import openai
import pytest

from proxy.settings import SettingsError, load_settings
from tests.helpers import Deployment, GatewayProcess, run_cli
from tests.test_jwt import Idp, ec_key, rsa_key

pytestmark = pytest.mark.timeout(120)

SSO_ISS = "https://login.acme-sso.test/"
GITHUB_ISS = "https://token.actions.githubusercontent.test"
K8S_ISS = "https://kubernetes.default.svc.test"
SSO_AUD, GITHUB_AUD, K8S_AUD = "tollway-gateway", "tollway-ci", "tollway"

ACCESS = """p, role:ci, acme, openai/gpt-4o, allow
p, *, acme, openai/gpt-4o-mini, allow
p, role:svc, acme, anthropic/claude-haiku-*, allow
p, role:contractors, acme, openai/gpt-4o-mini, deny
p, role:engineering, acme, anthropic/claude-*, allow
p, *, globex, openai/*, allow
"""
IDENTITIES = """# issuer-name, claim, value-glob, tenant, user, roles
github, sub, repo:acme/payments-*:ref:refs/heads/main, acme, ci:payments, ci
github, repository_owner, globex, globex, ci:globex,
k8s, sub, system:serviceaccount:billing:*, acme, svc:billing, svc
k8s, sub, system:serviceaccount:research:*, globex, , research|gpu
sso, email, *@contractors.example.com, acme, , contractors
"""


def auth_toml(idps: dict[str, Idp], ttl: str = "1h") -> str:
    return f'''
[auth]
exchange_ttl = "{ttl}"

[auth.jwt]
issuer = "{SSO_ISS}"
audience = "{SSO_AUD}"
jwks_url = "{idps['sso'].url}"

[[auth.issuers]]
name = "github"
issuer = "{GITHUB_ISS}"
audience = "{GITHUB_AUD}"
jwks_url = "{idps['github'].url}"
algorithms = ["RS256"]

[[auth.issuers]]
name = "k8s"
issuer = "{K8S_ISS}"
audience = "{K8S_AUD}"
jwks_url = "{idps['k8s'].url}"
algorithms = ["ES256"]
'''


def mint(key, kid: str, alg: str, **claims) -> str:
    now = int(time.time())
    body = {"iat": now, "nbf": now, "exp": now + 600} | claims
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=alg, headers={"kid": kid})


def github_token(idps, repo: str = "acme/payments-api", ref: str = "refs/heads/main", key=None, **claims) -> str:
    """Shaped like a GitHub Actions OIDC token."""
    owner = repo.split("/")[0]
    body = {"iss": GITHUB_ISS, "aud": GITHUB_AUD, "sub": f"repo:{repo}:ref:{ref}", "repository": repo,
            "repository_owner": owner, "ref": ref, "workflow": "deploy", "event_name": "push", "actor": "octocat",
            "run_id": "8812345", "job_workflow_ref": f"{repo}/.github/workflows/deploy.yml@{ref}",
            "jti": uuid.uuid4().hex} | claims
    return mint(key or idps["github"].keys["gh-1"], "gh-1", "RS256", **body)


def k8s_token(idps, namespace: str = "billing", account: str = "invoicer", **claims) -> str:
    """Shaped like a Kubernetes projected service-account token."""
    body = {"iss": K8S_ISS, "aud": [K8S_AUD], "sub": f"system:serviceaccount:{namespace}:{account}",
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": account, "uid": str(uuid.uuid4())},
                              "pod": {"name": f"{account}-7d9f", "uid": str(uuid.uuid4())}}} | claims
    return mint(idps["k8s"].keys["k8s-1"], "k8s-1", "ES256", **body)


def sso_token(idps, email: str = "zoe@acme.com", **claims) -> str:
    body = {"iss": SSO_ISS, "aud": SSO_AUD, "email": email, "org": "acme", "jti": uuid.uuid4().hex} | claims
    return mint(idps["sso"].keys["sso-1"], "sso-1", "RS256", **body)


def make_deployment(path: Path, sim_url: str, idps: dict[str, Idp], ttl: str = "1h") -> Deployment:
    dep = Deployment(path, sim_url)
    dep.add_test_keys()
    dep.issue_token("bob", "acme", "bob@acme.com")
    (path / "policy" / "access.csv").write_text(ACCESS)
    (path / "policy" / "identities.csv").write_text(IDENTITIES)
    (path / "policy" / "limits.csv").write_text("tenant,subject,metric,window,limit\n")
    dep.write_toml(extra=auth_toml(idps, ttl))
    return dep


@pytest.fixture(scope="module")
def idps():
    providers = {"sso": Idp().start(), "github": Idp().start(), "k8s": Idp().start()}
    providers["sso"].add("sso-1", rsa_key())
    providers["github"].add("gh-1", rsa_key())
    providers["k8s"].add("k8s-1", ec_key())
    yield providers
    for provider in providers.values():
        provider.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, simulator, idps):
    dep = make_deployment(tmp_path_factory.mktemp("identity") / "deploy", simulator.url, idps, ttl="2s")
    process = GatewayProcess(dep).start()
    yield process
    process.stop()


def gpt(url: str, credential: str, model: str = "gpt-4o-mini"):
    client = openai.OpenAI(base_url=url + "/openai/v1", api_key=credential, max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


def claude(url: str, credential: str, model: str = "claude-haiku-4-5"):
    client = anthropic.Anthropic(base_url=url + "/anthropic", api_key=credential, max_retries=0)
    return client.messages.create(model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}])


def exchange(url: str, credential: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {credential}"} if credential else {}
    return httpx.post(url + "/auth/token", headers=headers, timeout=10)


# --- mapping through identities.csv ------------------------------------------------------------------
def test_github_actions_token_of_payments_on_main_acts_as_ci_payments_with_role_ci(gw, idps):
    token = github_token(idps)
    assert gpt(gw.url, token, "gpt-4o").choices[0].message.content  # line 1 of access.csv: role:ci
    with pytest.raises(anthropic.PermissionDeniedError) as denied:  # role ci, not svc
        claude(gw.url, token)
    assert "Tenant 'acme' may not use model 'anthropic/claude-haiku-4-5'" in denied.value.message


def test_github_token_of_another_owner_maps_by_another_claim(gw, idps):
    token = github_token(idps, repo="globex/site")  # line 2: repository_owner globex -> tenant globex
    assert gpt(gw.url, token, "gpt-4.1").choices[0].message.content


def test_kubernetes_service_account_acts_as_svc_billing_with_role_svc(gw, idps):
    token = k8s_token(idps)
    assert claude(gw.url, token).content[0].text  # role:svc may use claude-haiku-* in acme
    assert gpt(gw.url, token).choices[0].message.content  # everyone in acme: gpt-4o-mini
    with pytest.raises(openai.PermissionDeniedError):  # gpt-4o is role:ci's only
        gpt(gw.url, token, "gpt-4o")


def test_empty_user_column_takes_the_user_claim(gw, idps):
    # line 4: research accounts act in globex as themselves (user_claim sub), roles research and gpu
    assert gpt(gw.url, k8s_token(idps, namespace="research", account="trainer"), "gpt-4.1").id


def test_sso_maps_through_its_entry_unless_a_line_matches(gw, idps):
    zoe = sso_token(idps, groups=["engineering"])  # no line: tenant from org, roles from groups
    assert claude(gw.url, zoe, "claude-sonnet-4-5").content[0].text
    # line 5 matches the contractor: tenant acme, user the email, roles contractors only (groups ignored)
    contractor = sso_token(idps, email="max@contractors.example.com", groups=["engineering"])
    with pytest.raises(openai.PermissionDeniedError):
        gpt(gw.url, contractor)  # access.csv line 4: contractors denied gpt-4o-mini
    with pytest.raises(anthropic.PermissionDeniedError):
        claude(gw.url, contractor, "claude-sonnet-4-5")  # not engineering through this line


# --- refusals ------------------------------------------------------------------------------------------
def test_a_trusted_token_no_line_matches_is_403_naming_the_issuer(gw, idps):
    token = github_token(idps, repo="acme/web")
    expected = ("No identity rule matched this token from issuer 'github': no line of policy/identities.csv for "
                "'github' matches it (sub='repo:acme/web:ref:refs/heads/main', repository_owner='acme'). Ask your "
                "governance lead to add one for this identity.")
    with pytest.raises(openai.PermissionDeniedError) as denied:
        gpt(gw.url, token)
    assert denied.value.body["message"] == expected and denied.value.body["code"] == "identity_not_mapped"
    with pytest.raises(anthropic.PermissionDeniedError) as in_anthropic_format:
        claude(gw.url, token)
    assert in_anthropic_format.value.body["error"] == {"type": "permission_error", "message": expected}
    feature_branch = github_token(idps, ref="refs/heads/feature")  # payments, but not main
    with pytest.raises(openai.PermissionDeniedError) as other_branch:
        gpt(gw.url, feature_branch)
    assert "sub='repo:acme/payments-api:ref:refs/heads/feature'" in other_branch.value.body["message"]


def test_unknown_issuer_wrong_audience_expired_and_mis_signed_tokens_are_401(gw, idps):
    now = int(time.time())
    stranger = Idp()  # never started: its tokens must be refused before any key is fetched
    stranger.add("gh-1", rsa_key())
    cases = [
        (mint(stranger.keys["gh-1"], "gh-1", "RS256", iss="https://evil.example/", aud=GITHUB_AUD, sub="repo:x"),
         "JWT issuer 'https://evil.example/' is not trusted by this gateway; it accepts tokens from "
         f"'{SSO_ISS}', '{GITHUB_ISS}', '{K8S_ISS}'. Ask your Tollway operator to add the issuer to "
         "[[auth.issuers]]."),
        (github_token(idps, aud="some-other-app"), "JWT audience does not match; this gateway accepts 'tollway-ci'."),
        (k8s_token(idps, aud=[SSO_AUD]), "JWT audience does not match; this gateway accepts 'tollway'."),
        (k8s_token(idps, iat=now - 7200, nbf=now - 7200, exp=now - 3600),
         "JWT has expired: sign in again to get a fresh one."),
        (github_token(idps, key=rsa_key()),
         "JWT signature does not verify: the token was altered or signed by another key."),
        (mint(ec_key(), "gh-1", "ES256", iss=GITHUB_ISS, aud=GITHUB_AUD, sub="repo:acme/payments-api:ref:x"),
         "JWT algorithm 'ES256' is not accepted; tokens must be signed with RS256."),
    ]
    for token, message in cases:
        with pytest.raises(openai.AuthenticationError) as refused:
            gpt(gw.url, token)
        assert refused.value.body["message"] == message
        assert refused.value.body["code"] == "invalid_tollway_credential"
        with pytest.raises(anthropic.AuthenticationError) as in_anthropic_format:
            claude(gw.url, token)
        assert in_anthropic_format.value.body["error"]["message"] == message
    assert stranger.hits == 0


# --- POST /auth/token ----------------------------------------------------------------------------------
def test_exchanged_token_works_until_its_expiry_and_not_after(gw, idps):
    answer = exchange(gw.url, k8s_token(idps))
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    token = body["token"]
    assert token.startswith("tw_")
    assert (body["tenant"], body["user"], body["roles"], body["identity_source"]) == ("acme", "svc:billing", ["svc"],
                                                                                       "k8s")
    expires = datetime.fromisoformat(body["expires_at"])
    assert 0 < (expires - datetime.now(UTC)).total_seconds() <= 2  # exchange_ttl = "2s"
    assert claude(gw.url, token).content[0].text  # the next request already knows it, with role svc
    with pytest.raises(openai.PermissionDeniedError):
        gpt(gw.url, token, "gpt-4o")
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.2)
    with pytest.raises(anthropic.AuthenticationError) as expired:
        claude(gw.url, token)
    assert expired.value.body["error"]["message"].startswith("Invalid, expired or revoked Tollway credential.")


def test_exchange_refusals_are_json_with_a_reason(gw, idps):
    cases = [
        (None, 401, "No credential sent. Send a JWT of a trusted issuer as `Authorization: Bearer <JWT>`."),
        (gw.deployment.tokens["bob"], 401, "Only a JWT can be exchanged, not a Tollway token or another key. Send a "
                                           "JWT of a trusted issuer as `Authorization: Bearer <JWT>`."),
        (github_token(idps, aud="x"), 401, "JWT audience does not match; this gateway accepts 'tollway-ci'."),
        (github_token(idps, repo="acme/web"), 403, None),
    ]
    for credential, status, message in cases:
        answer = exchange(gw.url, credential)
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith("application/json")
        error = answer.json()["error"]
        assert error["message"] == message if message else error["code"] == "identity_not_mapped"
        assert "token" not in answer.json()


def test_token_print_prints_only_the_token_for_api_key_helpers(gw, idps, tmp_path):
    jwt_file = tmp_path / "sa-token"
    jwt_file.write_text(k8s_token(idps) + "\n")
    from_file = run_cli(None, "token", "print", "--gateway", gw.url, "--jwt-file", str(jwt_file))
    assert from_file.returncode == 0, from_file.stderr
    token = from_file.stdout.strip()
    assert from_file.stdout == token + "\n" and token.startswith("tw_") and from_file.stderr == ""
    assert gpt(gw.url, token).choices[0].message.content
    from_env = run_cli(None, "token", "print", "--gateway", gw.url, "--jwt-env", "CI_OIDC_TOKEN",
                       env={"CI_OIDC_TOKEN": github_token(idps)})
    assert from_env.returncode == 0 and from_env.stdout.startswith("tw_")
    refused = run_cli(None, "token", "print", "--gateway", gw.url, "--jwt-env", "CI_OIDC_TOKEN",
                      env={"CI_OIDC_TOKEN": github_token(idps, repo="acme/web")})
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("error: the gateway refused the exchange (403): No identity rule matched this "
                                     "token from issuer 'github'")
    unset = run_cli(None, "token", "print", "--gateway", gw.url, "--jwt-env", "TOLLWAY_TEST_UNSET_VAR")
    assert (unset.returncode, unset.stderr) == (1, "error: no JWT in $TOLLWAY_TEST_UNSET_VAR (it is empty or unset)\n")


# --- events and the audit log (a gateway of their own: read once it stopped) ---------------------------
def test_events_carry_auth_method_and_identity_source_and_no_secret(tmp_path, simulator, idps):
    dep = make_deployment(tmp_path / "deploy", simulator.url, idps)
    gateway = GatewayProcess(dep).start()
    try:
        github = github_token(idps)
        assert gpt(gateway.url, github).id  # 1: jwt, github
        assert gpt(gateway.url, sso_token(idps)).id  # 2: jwt, sso
        exchanged = exchange(gateway.url, k8s_token(idps)).json()["token"]
        assert gpt(gateway.url, exchanged).id  # 3: exchanged, k8s
        assert gpt(gateway.url, dep.tokens["bob"]).id  # 4: token, no identity source
        with pytest.raises(openai.PermissionDeniedError):
            gpt(gateway.url, github_token(idps, repo="acme/web"))  # 5: refused before an identity exists
    finally:
        assert gateway.stop() == 0
    rows = dep.events()
    assert [(r["auth_method"], r["identity_source"], r["tenant"], r["status_code"]) for r in rows] == [
        ("jwt", "github", "acme", 200), ("jwt", "sso", "acme", 200), ("exchanged", "k8s", "acme", 200),
        ("token", None, "acme", 200), (None, None, None, 403)]
    pseudonyms = {r["user_pseudonym"] for r in rows[:4]}
    assert len(pseudonyms) == 4 and None not in pseudonyms  # ci:payments, zoe, svc:billing, bob: one each
    entries = dep.store().audit_entries(action="token.exchanged")
    assert len(entries) == 1
    details = json.loads(entries[0]["details"])
    assert set(details) == {"issuer", "tenant", "roles", "user_pseudonym", "expires_at"}
    assert (details["issuer"], details["tenant"], details["roles"]) == ("k8s", "acme", ["svc"])
    assert details["user_pseudonym"] == str(rows[2]["user_pseudonym"])  # the same pseudonym as its events
    with sqlite3.connect(dep.path / "control.db") as db:
        audit_text = json.dumps(db.execute("SELECT * FROM audit_log").fetchall())
        stored = db.execute("SELECT token_hash, identity_source FROM client_tokens WHERE identity_source IS NOT NULL"
                            ).fetchall()
    assert len(stored) == 1 and stored[0][1] == "k8s" and exchanged not in stored[0][0]
    raw_events = (dep.path / "events.duckdb").read_bytes()
    for secret in (exchanged, exchanged[3:], "svc:billing", "ci:payments", "zoe@acme.com", github.split(".")[2]):
        assert secret not in audit_text
        assert secret.encode() not in raw_events
    assert (dep.path / "gateway.log").read_text().count(exchanged[3:]) == 0


# --- hot reload -------------------------------------------------------------------------------------------
def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_identities_csv_reloads_atomically(tmp_path, simulator, idps):
    dep = make_deployment(tmp_path / "deploy", simulator.url, idps)
    gateway = GatewayProcess(dep).start()
    path = dep.path / "policy" / "identities.csv"
    token = github_token(idps)  # the same token throughout: its verification is cached, its mapping is not
    try:
        def version() -> str:
            return httpx.get(gateway.url + "/readyz", timeout=5).json()["policy"]["version"]

        first = version()
        assert gpt(gateway.url, token, "gpt-4o").id  # role ci
        path.write_text(IDENTITIES.replace("ci:payments, ci", "ci:payments,"))  # role ci taken away
        wait_for(lambda: version() != first)
        with pytest.raises(openai.PermissionDeniedError):
            gpt(gateway.url, token, "gpt-4o")
        second = version()
        # an invalid edit: line 2 gives the role back, line 3 names a tenant that does not exist
        path.write_text("github, sub, repo:acme/payments-*, acme, ci:payments, ci\n"
                        "github, sub, repo:initech/*, initech, ci:initech, ci\n")
        ready = wait_for(lambda: (r := httpx.get(gateway.url + "/readyz", timeout=5).json())["checks"]["policy"]
                         != "ok" and r)
        assert ready["checks"]["policy"] == ("last edit refused: policy/identities.csv:2: error: tenant 'initech' "
                                             "is not in tenants.csv (an identity acts in one named tenant, never *)")
        assert ready["policy"]["version"] == second  # the rules before the edit stay in force, whole
        with pytest.raises(openai.PermissionDeniedError):
            gpt(gateway.url, token, "gpt-4o")
        assert gpt(gateway.url, token).id  # ... and still map the token (line 1 of the old file)
    finally:
        gateway.stop()


# --- policy explain --jwt and policy test ----------------------------------------------------------------
def test_policy_explain_jwt_shows_the_line_the_identity_and_the_decision(gw, idps, tmp_path):
    token_file = tmp_path / "ci.jwt"
    token_file.write_text(github_token(idps))
    result = run_cli(gw.deployment.path, "policy", "explain", "--jwt", str(token_file), "--model", "openai/gpt-4o")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:5] == [
        f"JWT of issuer 'github' ({GITHUB_ISS}); its signature, audience and expiry are not checked here",
        "  identity: policy/identities.csv:2: github, sub, repo:acme/payments-*:ref:refs/heads/main, acme, "
        "ci:payments, ci",
        "    → tenant acme, user ci:payments, roles ci",
        "ci:payments (role:ci) in tenant acme → openai/gpt-4o: ALLOW",
        "  decided by: policy/access.csv:1",
    ]
    as_json = json.loads(run_cli(gw.deployment.path, "policy", "explain", "--jwt", str(token_file), "--model",
                                 "openai/gpt-4o", "--json").stdout)
    assert as_json["identity"]["decided_by"] == "policy/identities.csv:2"
    assert (as_json["tenant"], as_json["user"], as_json["roles"], as_json["decision"]) == (
        "acme", "ci:payments", ["ci"], "allow")

    token_file.write_text(github_token(idps, repo="acme/web"))
    unmapped = run_cli(gw.deployment.path, "policy", "explain", "--jwt", str(token_file), "--model", "openai/gpt-4o")
    assert unmapped.returncode == 0
    assert unmapped.stdout.splitlines()[1].startswith("  identity: none: 403 No identity rule matched this token from "
                                                      "issuer 'github'")
    token_file.write_text(sso_token(idps))
    via_entry = run_cli(gw.deployment.path, "policy", "explain", "--jwt", str(token_file), "--model",
                        "openai/gpt-4o-mini")
    assert via_entry.stdout.splitlines()[1:4] == [
        "  identity: the issuer entry (no line of policy/identities.csv matched)",
        "    → tenant acme, user zoe@acme.com, roles none",
        "zoe@acme.com (no token roles) in tenant acme → openai/gpt-4o-mini: ALLOW"]
    token_file.write_text(mint(rsa_key(), "x", "RS256", iss="https://evil.example/", sub="x"))
    untrusted = run_cli(gw.deployment.path, "policy", "explain", "--jwt", str(token_file), "--model", "openai/gpt-4o")
    assert untrusted.returncode == 1 and "is not trusted by tollway.toml" in untrusted.stderr
    both = run_cli(gw.deployment.path, "policy", "explain", "--jwt", str(token_file), "--tenant", "acme",
                   "--model", "openai/gpt-4o")
    assert both.returncode == 2


IDENTITY_CASES = """issuer,claims,tenant,user,roles,model,expect
github,sub=repo:acme/payments-api:ref:refs/heads/main,acme,ci:payments,ci,openai/gpt-4o,allow
github,sub=repo:acme/payments-api:ref:refs/heads/main,acme,ci:payments,ci,anthropic/claude-haiku-4-5,deny
github,sub=repo:acme/web:ref:refs/heads/main|repository_owner=acme,,,,,unmapped
k8s,sub=system:serviceaccount:research:trainer,globex,system:serviceaccount:research:trainer,gpu|research,openai/gpt-4.1,allow
sso,email=max@contractors.example.com|org=acme|groups=engineering|groups=admins,acme,max@contractors.example.com,contractors,openai/gpt-4o-mini,deny
sso,email=zoe@acme.com|org=acme|groups=engineering,acme,zoe@acme.com,engineering,anthropic/claude-sonnet-4-5,allow
"""


def test_policy_test_covers_identity_rules(gw, tmp_path):
    cases = tmp_path / "identity-cases.csv"
    cases.write_text(IDENTITY_CASES)
    passing = run_cli(gw.deployment.path, "policy", "test", str(cases))
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert passing.stderr.strip() == "6 cases, 6 passed, 0 failed"
    cases.write_text(IDENTITY_CASES.splitlines()[0] + "\n"
                     "github,sub=repo:acme/payments-api:ref:refs/heads/main,acme,ci:payments,admin,openai/gpt-4o,allow\n"
                     "k8s,sub=system:serviceaccount:billing:x,acme,svc:billing,svc,openai/gpt-4o,unmapped\n"
                     "gitlab,sub=project_path:acme/x,acme,ci,,openai/gpt-4o,allow\n"
                     "operations,with,operation,header,too,x\n")
    failing = run_cli(gw.deployment.path, "policy", "test", str(cases))
    assert failing.returncode == 1
    assert failing.stdout.splitlines() == [
        "identity-cases.csv:4: error: issuer 'gitlab' is not an [[auth.issuers]] entry of tollway.toml",
        "identity-cases.csv:5: error: expected 7 columns, got 6",
        "identity-cases.csv:2: FAIL github token as acme ci:payments [admin] openai/gpt-4o: expected allow, got "
        "mapped to acme ci:payments [ci] (policy/identities.csv:2)",
        "identity-cases.csv:3: FAIL k8s token as acme svc:billing [svc] openai/gpt-4o: expected unmapped, got "
        "mapped to acme svc:billing [svc] (policy/identities.csv:4)",
    ]
    assert failing.stderr.strip() == "2 cases, 0 passed, 2 failed"
    old_format = tmp_path / "plain.csv"
    old_format.write_text("tenant,user,roles,model,expect\nacme,bob@acme.com,,openai/gpt-4o-mini,allow\n")
    assert run_cli(gw.deployment.path, "policy", "test", str(old_format)).returncode == 0


# --- validation ------------------------------------------------------------------------------------------------
def test_identities_csv_problems_carry_file_and_line(tmp_path):
    root = tmp_path / "deploy"
    assert run_cli(None, "init", str(root)).returncode == 0
    with (root / "tollway.toml").open("a") as toml:
        for name in ("github", "k8s"):
            toml.write(f'[[auth.issuers]]\nname = "{name}"\nissuer = "https://{name}.test"\naudience = "tollway"\n'
                       f'jwks_url = "https://{name}.test/jwks"\n')
    (root / "policy" / "identities.csv").write_text(
        "\ufeff# issuer-name, claim, value-glob, tenant, user, roles\n"
        "github, sub, repo:acme/*, acme, ci:acme, ci\n"
        "github, sub, repo:acme/payments-*, acme, ci:payments, ci\n"
        "github, sub, repo:*, initech, ci, ci\n"
        "github, sub, repo:acme/x\n"
        "git hub, sub, x, acme, ci,\n"
        "k8s, sub, system:*, acme, svc billing, svc\n"
        "k8s, sub, system:*, acme, svc, bad role\n"
        "gitlab, sub, project_path:acme/*, acme, ci,\n")
    result = run_cli(root, "policy", "check")
    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if line.startswith("policy/identities.csv")]
    assert problems == [
        "policy/identities.csv:3: warning: never applies: line 2 matches every token this line matches, and the "
        "first match wins",
        "policy/identities.csv:4: error: tenant 'initech' is not in tenants.csv (an identity acts in one named "
        "tenant, never *)",
        "policy/identities.csv:5: error: expected 6 fields (issuer-name, claim, value-glob, tenant, user, roles), "
        "got 3",
        "policy/identities.csv:6: error: issuer-name 'git hub' is not valid: use the name of an [[auth.issuers]] "
        "entry, e.g. github",
        "policy/identities.csv:7: error: user 'svc billing' may only hold letters, digits and . _ @ : - (or leave it "
        "empty: the token's user claim then names the user)",
        "policy/identities.csv:8: error: role 'bad role' may only hold letters, digits and . _ @ : -",
        "policy/identities.csv:9: warning: issuer 'gitlab' is not an [[auth.issuers]] entry of tollway.toml "
        "(known: github, k8s): this line never matches",
    ]
    (root / "policy" / "identities.csv").unlink()  # optional: no file, no problem (the others: keys not added yet)
    assert "identities.csv" not in run_cli(root, "policy", "check").stderr


@pytest.mark.parametrize(("toml", "message"), [
    ('[[auth.issuers]]\nname = "gh"\nissuer = "https://i"\njwks_url = "https://i/jwks"\n',
     "[[auth.issuers]] #1: audience required"),
    ('[[auth.issuers]]\nname = "gh"\nissuer = "https://i"\naudience = "a"\n',
     "[[auth.issuers]] #1: give exactly one of jwks_url and public_key_file"),
    ('[[auth.issuers]]\nname = "gh"\nissuer = "https://i"\naudience = "a"\njwks_url = "u"\ntenant = "acme"\n'
     'tenant_claim = "org"\n', "[[auth.issuers]] #1: give tenant_claim or tenant, not both"),
    ('[[auth.issuers]]\nname = "gh"\nissuer = "https://i"\naudience = "a"\njwks_url = "u"\nalgorithms = ["HS256"]\n',
     "[[auth.issuers]] #1: algorithms ['HS256'] not accepted"),
    ('[[auth.issuers]]\nname = "gh"\nissuer = "https://i"\naudience = "a"\njwks_url = "u"\nroles = "ci"\n',
     "[[auth.issuers]] #1: roles must be a list of strings"),
    ('[[auth.issuers]]\nname = "gh"\nissuer = "https://i"\naudience = "a"\njwks_url = "u"\ngroups = "x"\n',
     "[[auth.issuers]] #1: unknown key(s) ['groups']"),
    ('[auth.jwt]\nissuer = "https://i"\njwks_url = "u"\n[[auth.issuers]]\nname = "gh"\nissuer = "https://i"\n'
     'audience = "a"\njwks_url = "u"\n', "[auth]: two issuer entries share the issuer 'https://i'"),
    ('[auth]\nexchange_ttl = "an hour"\n', "[auth]: exchange_ttl 'an hour' must be a duration, e.g. 30s, 5m, 1h"),
    ('[auth]\nexchange = "1h"\n', "[auth]: unknown key(s) ['exchange']"),
    ('[auth]\nexchange_ttl = "5w"\n', "[auth]: exchange_ttl '5w' is longer than 30d"),
])
def test_issuer_settings_are_validated_by_name(tmp_path, toml, message):
    (tmp_path / "tollway.toml").write_text(toml)
    with pytest.raises(SettingsError) as refused:
        load_settings(tmp_path)
    assert message in str(refused.value)


def test_issuer_settings_defaults_and_the_old_table(tmp_path):
    (tmp_path / "tollway.toml").write_text(
        '[auth]\nexchange_ttl = "30s"\n[auth.jwt]\nissuer = "https://sso"\njwks_url = "https://sso/keys"\n'
        '[[auth.issuers]]\nname = "k8s"\nissuer = "https://k8s"\naudience = "tollway"\npublic_key_file = "k.pem"\n'
        'roles = ["svc"]\n')
    auth = load_settings(tmp_path).auth
    assert auth.exchange_ttl.total_seconds() == 30
    sso, k8s = auth.issuers
    assert (sso.name, sso.audience, sso.user_claim, sso.tenant_claim, sso.roles_claim, sso.algorithms) == (
        "sso", None, "email", "org", "groups", ("RS256", "ES256"))
    assert (k8s.name, k8s.user_claim, k8s.tenant_claim, k8s.tenant, k8s.roles, k8s.maps_tenant) == (
        "k8s", "sub", None, None, ("svc",), False)
    (tmp_path / "tollway.toml").write_text('[auth.jwt]\n# issuer = "https://sso"\n')  # the sample: no issuer yet
    assert load_settings(tmp_path).auth.issuers == ()


def test_control_db_from_before_the_exchange_gains_the_column(tmp_path, simulator):
    dep = Deployment(tmp_path / "deploy", simulator.url)
    token = dep.issue_token("old", "acme", "old@acme.com")
    with sqlite3.connect(dep.path / "control.db") as db:
        db.execute("ALTER TABLE client_tokens DROP COLUMN identity_source")
    store = dep.store()  # opening it adds the column back; the old token keeps working as a plain token
    try:
        [listed] = store.list_tokens()
        assert (listed.user_id, listed.identity_source) == ("old@acme.com", None)
        assert token.startswith("tw_")
    finally:
        store.close()
