"""`tollway policy explain` and `tollway policy test`, run as the real command on a deployment made
with the CLI (sample access policy, keys added and revoked with `tollway keys`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.timeout(60)

ACCESS_EXTRA = "g, ivan@acme.com, role:interns, acme\n"
ROUTES = """# acme pays Anthropic itself; its old key was revoked
p, acme, anthropic/*, old-anthropic|acme-anthropic|operator-anthropic
p, *, openai/*, operator-openai
p, *, gemini/*, operator-gemini
p, *, anthropic/*, operator-anthropic
"""
LIMITS = """tenant,subject,metric,window,limit
acme,tenant,usd,month,5000
acme,*,requests,minute,60
acme,role:interns,usd,day,5
acme,dana@acme.com,requests,hour,10
globex,tenant,usd,month,100
*,*,tokens,minute,200000
"""


def ok(data_dir: Path | None, *args: str, stdin: str | None = None):
    result = run_cli(data_dir, *args, stdin=stdin)
    assert result.returncode == 0, f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("policy-cli") / "deploy"
    ok(None, "init", str(root))
    for key_id, provider, owner in [("operator-openai", "openai", None), ("operator-gemini", "gemini", None),
                                    ("operator-anthropic", "anthropic", None), ("old-anthropic", "anthropic", "acme"),
                                    ("acme-anthropic", "anthropic", "acme")]:
        ok(root, "keys", "add", key_id, "--provider", provider,
           *(["--tenant", owner] if owner else ["--operator"]), stdin=f"sk-{key_id}\n")
    ok(root, "keys", "revoke", "old-anthropic")
    access = root / "policy/access.csv"
    access.write_text(access.read_text() + ACCESS_EXTRA)
    (root / "policy/routes.csv").write_text(ROUTES)
    (root / "policy/limits.csv").write_text(LIMITS)
    check = run_cli(root, "policy", "check")
    assert check.returncode == 0, check.stderr
    return root


def explain(data_dir: Path, tenant: str, user: str, model: str, *roles: str, as_json: bool = False):
    args = ["policy", "explain", "--tenant", tenant, "--user", user, "--model", model]
    args += [a for r in roles for a in ("--role", r)] + (["--json"] if as_json else [])
    result = ok(data_dir, *args)
    return json.loads(result.stdout) if as_json else result.stdout.rstrip("\n").splitlines()


def limit_lines(doc: dict) -> list[str]:
    return [lim["line"] for lim in doc["limits"]]


# --- explain ------------------------------------------------------------------------------------
def test_explain_deny_overrides_allow_with_every_matching_rule_human(deploy):
    lines = explain(deploy, "acme", "dana@acme.com", "anthropic/claude-opus-4-1", "engineering", "contractors")
    assert lines == [
        "dana@acme.com (role:engineering, role:contractors) in tenant acme → anthropic/claude-opus-4-1: DENY",
        "  decided by: policy/access.csv:5",
        "  matching rules:",
        "    policy/access.csv:3: p, role:engineering, acme, anthropic/claude-*, allow",
        "    policy/access.csv:5: p, role:contractors, acme, anthropic/claude-opus-*, deny  ← decides",
        "  key route: policy/routes.csv:2",
        "    old-anthropic: revoked (byok)",
        "    acme-anthropic: active (byok)",
        "    operator-anthropic: active (unified)",
        "  would use: acme-anthropic, billing byok",
        "  limits:",
        "    policy/limits.csv:2: acme, tenant: 5000 usd per month",
        "    policy/limits.csv:3: acme, *: 60 requests per minute",
        "    policy/limits.csv:5: acme, dana@acme.com: 10 requests per hour",
        "    policy/limits.csv:7: *, *: 200000 tokens per minute",
        "  price: claude-opus-4-1 (genai-prices 0.2.5): $15 in / $75 out per million tokens",
    ]


def test_explain_json_has_decision_rules_route_key_billing_and_limits(deploy):
    doc = explain(deploy, "acme", "dana@acme.com", "anthropic/claude-opus-4-1", "engineering", "contractors",
                  as_json=True)
    assert doc == {
        "tenant": "acme", "user": "dana@acme.com", "roles": ["engineering", "contractors"],
        "model": "anthropic/claude-opus-4-1", "decision": "deny", "deciding_rule": "policy/access.csv:5",
        "matching_rules": [
            {"line": "policy/access.csv:3", "subject": "role:engineering", "tenant": "acme",
             "model": "anthropic/claude-*", "effect": "allow", "decided": False},
            {"line": "policy/access.csv:5", "subject": "role:contractors", "tenant": "acme",
             "model": "anthropic/claude-opus-*", "effect": "deny", "decided": True},
        ],
        "route": {"line": "policy/routes.csv:2", "keys": [
            {"key_id": "old-anthropic", "status": "revoked", "billing_mode": "byok"},
            {"key_id": "acme-anthropic", "status": "active", "billing_mode": "byok"},
            {"key_id": "operator-anthropic", "status": "active", "billing_mode": "unified"}]},
        "key": "acme-anthropic", "billing_mode": "byok",
        "limits": [
            {"line": "policy/limits.csv:2", "tenant": "acme", "subject": "tenant", "metric": "usd",
             "window": "month", "limit": "5000"},
            {"line": "policy/limits.csv:3", "tenant": "acme", "subject": "*", "metric": "requests",
             "window": "minute", "limit": "60"},
            {"line": "policy/limits.csv:5", "tenant": "acme", "subject": "dana@acme.com", "metric": "requests",
             "window": "hour", "limit": "10"},
            {"line": "policy/limits.csv:7", "tenant": "*", "subject": "*", "metric": "tokens",
             "window": "minute", "limit": "200000"},
        ],
        "price": {"priced_model": "claude-opus-4-1", "source": "genai-prices 0.2.5", "input_usd_per_mtok": "15",
                  "output_usd_per_mtok": "75"},
    }


def test_explain_role_from_a_g_line(deploy):
    """alice has no token role: role:engineering comes from the g line; no user or role limits of others."""
    doc = explain(deploy, "acme", "alice@acme.com", "anthropic/claude-sonnet-4-5", as_json=True)
    assert (doc["decision"], doc["deciding_rule"]) == ("allow", "policy/access.csv:3")
    assert [(r["line"], r["decided"]) for r in doc["matching_rules"]] == [("policy/access.csv:3", True)]
    assert (doc["key"], doc["billing_mode"]) == ("acme-anthropic", "byok")
    assert limit_lines(doc) == ["policy/limits.csv:2", "policy/limits.csv:3", "policy/limits.csv:7"]
    lines = explain(deploy, "acme", "alice@acme.com", "anthropic/claude-sonnet-4-5")
    assert lines[0] == "alice@acme.com (no token roles) in tenant acme → anthropic/claude-sonnet-4-5: ALLOW"
    assert "    policy/access.csv:3: p, role:engineering, acme, anthropic/claude-*, allow  ← decides" in lines


@pytest.mark.parametrize(("user", "roles"), [("bob@acme.com", ("interns",)), ("ivan@acme.com", ())],
                         ids=["token-role", "g-line-role"])
def test_role_limits_apply_to_role_members_only(deploy, user, roles):
    doc = explain(deploy, "acme", user, "openai/gpt-4o-mini", *roles, as_json=True)
    assert (doc["decision"], doc["deciding_rule"]) == ("allow", "policy/access.csv:4")
    assert limit_lines(doc) == ["policy/limits.csv:2", "policy/limits.csv:3", "policy/limits.csv:4",
                                "policy/limits.csv:7"]
    assert "    policy/limits.csv:4: acme, role:interns: 5 usd per day" in explain(
        deploy, "acme", user, "openai/gpt-4o-mini", *roles)
    # and not to anyone else in the tenant
    assert "policy/limits.csv:4" not in limit_lines(explain(deploy, "acme", "bob@acme.com", "openai/gpt-4o-mini",
                                                            as_json=True))


def test_explain_default_deny_and_unified_billing(deploy):
    lines = explain(deploy, "globex", "carol@globex.com", "anthropic/claude-haiku-4-5")
    assert lines == [
        "carol@globex.com (no token roles) in tenant globex → anthropic/claude-haiku-4-5: DENY",
        "  decided by: no rule matched (default deny)",
        "  matching rules: none",
        "  key route: policy/routes.csv:5",
        "    operator-anthropic: active (unified)",
        "  would use: operator-anthropic, billing unified",
        "  limits:",
        "    policy/limits.csv:6: globex, tenant: 100 usd per month",
        "    policy/limits.csv:7: *, *: 200000 tokens per minute",
        "  price: claude-haiku-4-5 (genai-prices 0.2.5): $1 in / $5 out per million tokens",
    ]
    unpriced = explain(deploy, "globex", "carol@globex.com", "openai/gpt-unreleased-9")
    assert unpriced[-1] == "  price: none (refused under the usd limit above: price it in pricing.csv)"
    doc = explain(deploy, "globex", "carol@globex.com", "openai/gpt-4o", as_json=True)
    assert (doc["decision"], doc["deciding_rule"], doc["key"], doc["billing_mode"]) == (
        "allow", "policy/access.csv:6", "operator-openai", "unified")
    assert doc["route"]["line"] == "policy/routes.csv:3"


def test_explain_rule_for_every_tenant(deploy):
    doc = explain(deploy, "globex", "root@globex.com", "gemini/gemini-2.5-pro", "platform-admins", as_json=True)
    assert doc["decision"] == "allow"
    assert [(r["line"], r["tenant"], r["decided"]) for r in doc["matching_rules"]] == [
        ("policy/access.csv:7", "globex", doc["deciding_rule"] == "policy/access.csv:7"),
        ("policy/access.csv:8", "*", doc["deciding_rule"] == "policy/access.csv:8")]
    assert sum(r["decided"] for r in doc["matching_rules"]) == 1


def test_explain_model_without_a_route(deploy):
    lines = explain(deploy, "acme", "root@acme.com", "mistral/mistral-large", "platform-admins")
    assert lines[0].endswith("→ mistral/mistral-large: ALLOW")
    assert "  key route: none (requests would get 403 no key route)" in lines
    doc = explain(deploy, "acme", "root@acme.com", "mistral/mistral-large", "platform-admins", as_json=True)
    assert (doc["route"], doc["key"], doc["billing_mode"]) == (None, None, None)


def test_explain_route_with_no_usable_key(deploy, tmp_path):
    copy = tmp_path / "deploy"
    shutil.copytree(deploy, copy)
    (copy / "policy/routes.csv").write_text("p, *, openai/*, operator-openai\np, acme, anthropic/*, old-anthropic\n")
    lines = explain(copy, "acme", "alice@acme.com", "anthropic/claude-sonnet-4-5")
    assert lines[4:7] == ["  key route: policy/routes.csv:2", "    old-anthropic: revoked (byok)",
                          "  would use: no usable key"]


def test_explain_model_without_provider_is_a_usage_error(deploy):
    result = run_cli(deploy, "policy", "explain", "--tenant", "acme", "--user", "bob@acme.com", "--model", "gpt-4o")
    assert result.returncode == 2
    assert "error: --model 'gpt-4o': name it provider/..., e.g. openai/gpt-4o-mini" in result.stderr
    assert result.stdout == ""
    missing = run_cli(deploy, "policy", "explain", "--user", "bob@acme.com", "--model", "openai/gpt-4o")
    assert missing.returncode == 2 and "--tenant" in missing.stderr


def test_explain_on_an_invalid_policy_exits_1(deploy, tmp_path):
    copy = tmp_path / "deploy"
    shutil.copytree(deploy, copy)
    (copy / "policy/access.csv").write_text("p, *, acme, openai/gpt-4o-mini, alow\n")
    result = run_cli(copy, "policy", "explain", "--tenant", "acme", "--user", "bob@acme.com",
                     "--model", "openai/gpt-4o-mini", "--json")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "policy/access.csv:1: error: unknown effect 'alow': use allow or deny" in result.stderr


# --- policy test ---------------------------------------------------------------------------------
PASSING = """tenant,user,roles,model,expect
# engineers may use Claude, contractors not Opus
acme,alice@acme.com,,anthropic/claude-sonnet-4-5,allow
acme,dana@acme.com,engineering|contractors,anthropic/claude-opus-4-1,deny
acme,dana@acme.com,engineering|contractors,anthropic/claude-sonnet-4-5,allow

acme,bob@acme.com,,openai/gpt-4o-mini,allow
acme,bob@acme.com,,openai/gpt-4o,deny
globex,carol@globex.com,,gemini/gemini-2.5-flash,allow
globex,carol@globex.com,,anthropic/claude-haiku-4-5,deny
initech,root@initech.com,platform-admins,openai/o3,allow
"""


def run_cases(data_dir: Path, tmp_path: Path, text: str, name: str = "cases.csv"):
    path = tmp_path / name
    path.write_text(text)
    return run_cli(data_dir, "policy", "test", str(path))


def test_policy_test_all_passing_exits_0(deploy, tmp_path):
    result = run_cases(deploy, tmp_path, PASSING)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.strip() == "8 cases, 8 passed, 0 failed"


def test_policy_test_prints_each_failing_case_with_the_deciding_rule(deploy, tmp_path):
    text = PASSING.replace("openai/gpt-4o,deny", "openai/gpt-4o,allow").replace(
        "engineering|contractors,anthropic/claude-opus-4-1,deny", "engineering|contractors,anthropic/claude-opus-4-1,allow")
    result = run_cases(deploy, tmp_path, text + "globex,carol@globex.com,,openai/gpt-4o,deny\n", "expectations.csv")
    assert result.returncode == 1
    assert result.stdout.strip().splitlines() == [
        "expectations.csv:4: FAIL acme dana@acme.com [engineering|contractors] anthropic/claude-opus-4-1: "
        "expected allow, got deny (policy/access.csv:5)",
        "expectations.csv:8: FAIL acme bob@acme.com [] openai/gpt-4o: expected allow, got deny (default deny)",
        "expectations.csv:12: FAIL globex carol@globex.com [] openai/gpt-4o: expected deny, got allow "
        "(policy/access.csv:6)",
    ]
    assert result.stderr.strip() == "9 cases, 6 passed, 3 failed"


@pytest.mark.parametrize(("text", "problem"), [
    ("tenant,user,role,model,expect\nacme,bob@acme.com,,openai/gpt-4o-mini,allow\n",
     "cases.csv:1: error: header must be tenant,user,roles,model,expect or tenant,user,roles,model,operation,expect"),
    ("", "cases.csv:0: error: header must be tenant,user,roles,model,expect or tenant,user,roles,model,operation,expect"),
    ("tenant,user,roles,model,expect\nacme,bob@acme.com,,openai/gpt-4o-mini,allow\n"
     "acme,bob@acme.com,,openai/gpt-4o,yes\n",
     "cases.csv:3: error: expect must be allow or deny, got 'yes'"),
    ("tenant,user,roles,model,expect\nacme,bob@acme.com,openai/gpt-4o-mini,allow\n",
     "cases.csv:2: error: expected 5 columns, got 4"),
], ids=["bad-header", "empty-file", "bad-expect", "wrong-columns"])
def test_policy_test_bad_cases_file_exits_1(deploy, tmp_path, text, problem):
    result = run_cases(deploy, tmp_path, text)
    assert result.returncode == 1
    assert problem in result.stdout.splitlines()


def test_policy_test_missing_file_and_invalid_policy_exit_1(deploy, tmp_path):
    missing = run_cli(deploy, "policy", "test", str(tmp_path / "nope.csv"))
    assert missing.returncode == 1 and "error: no file" in missing.stderr
    copy = tmp_path / "deploy"
    shutil.copytree(deploy, copy)
    (copy / "tenants.csv").write_text("tenant,name,markup_pct,byok_fee_pct\nacme,Acme,0,0\n")
    result = run_cases(copy, tmp_path, PASSING)
    assert result.returncode == 1
    assert "policy/access.csv:6: error: tenant 'globex' is not in tenants.csv" in result.stderr


# --- operations.csv ----------------------------------------------------------------------------------
def test_explain_an_operation_names_the_deciding_line_of_operations_csv(deploy):
    fine_tuning = ok(deploy, "policy", "explain", "--tenant", "acme", "--user", "bob@acme.com",
                     "--operation", "openai/fine_tuning.jobs.create", "--json")
    doc = json.loads(fine_tuning.stdout)["operation"]
    assert (doc["operation"], doc["decision"]) == ("openai/fine_tuning.jobs.create", "deny")
    assert doc["deciding_rule"] == "policy/operations.csv:27"  # the sample's `*/fine_tuning.*` deny
    admin = ok(deploy, "policy", "explain", "--tenant", "acme", "--user", "bob@acme.com", "--operation", "openai/admin")
    assert "operation openai/admin: DENY" in admin.stdout
    assert "no rule names 'admin' (default deny: `*` never allows it)" in admin.stdout
    both = json.loads(ok(deploy, "policy", "explain", "--tenant", "acme", "--user", "bob@acme.com", "--model",
                         "openai/gpt-4o-mini", "--operation", "openai/files.create", "--json").stdout)
    assert both["decision"] == "allow" and both["operation"]["decision"] == "allow"
    assert both["operation"]["deciding_rule"] == "policy/operations.csv:22"  # `*/files.*`
    neither = run_cli(deploy, "policy", "explain", "--tenant", "acme", "--user", "bob@acme.com")
    assert neither.returncode == 2 and "give --model, --operation or both" in neither.stderr


def test_policy_test_checks_operations_with_an_operation_column(deploy, tmp_path):
    cases = tmp_path / "cases.csv"
    cases.write_text("tenant,user,roles,model,operation,expect\n"
                     "acme,bob@acme.com,,openai/gpt-4o-mini,openai/chat.completions.create,allow\n"
                     "acme,bob@acme.com,,,openai/files.list,allow\n"
                     "acme,bob@acme.com,,,openai/fine_tuning.jobs.create,deny\n"
                     "acme,bob@acme.com,,,openai/admin,deny\n"
                     "acme,bob@acme.com,,openai/gpt-4o,openai/chat.completions.create,allow\n"  # a wrong case
                     "acme,bob@acme.com,,,,allow\n")
    result = run_cli(deploy, "policy", "test", str(cases))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "cases.csv:7: error: name a model, an operation, or both",
        "cases.csv:6: FAIL acme bob@acme.com [] openai/gpt-4o openai/chat.completions.create: expected allow, "
        "got deny (default deny)",
    ]
    assert "5 cases, 4 passed, 1 failed" in result.stderr


def test_an_invalid_operations_csv_is_refused_with_file_and_line(deploy, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(deploy, copy)
    (copy / "policy/operations.csv").write_text("p, *, *, files.create, allow\np, *, nowhere, */files.*, allow\n"
                                               "g, bob@acme.com, role:x, acme\n")
    result = run_cli(copy, "policy", "check")
    assert result.returncode == 1
    assert ("policy/operations.csv:1: error: bad operation glob 'files.create': use provider/operation with * and ? "
            "wildcards, e.g. openai/files.* or */fine_tuning.*") in result.stderr
    assert "policy/operations.csv:2: error: tenant 'nowhere' is not in tenants.csv" in result.stderr
    assert "policy/operations.csv:3: error: unknown rule type 'g'" in result.stderr
    (copy / "policy/operations.csv").unlink()
    missing = run_cli(copy, "policy", "check")
    assert missing.returncode == 0
    assert "policy/operations.csv:0: warning: file is missing: the default operations policy applies" in missing.stderr
