"""`tollway policy check`: one case per validation rule, with the exact `file:line: severity: message`.

Errors make the command exit 1; a set with only warnings exits 0 and still prints them. Every case
starts from the same valid deployment (made by `tollway init`, keys added with the CLI) and
overwrites one or two files, so the line numbers in the expectations are those of the text below.
"""

from __future__ import annotations

import shutil
from decimal import Decimal
from pathlib import Path

import pytest

from policy.files import load_policy_files
from proxy.cli import main as cli_main
from tests.helpers import run_cli

pytestmark = pytest.mark.timeout(60)

TENANTS = "tenant,name,markup_pct,byok_fee_pct\nacme,Acme Corp,0,2.5\nglobex,Globex Inc,12,0\n"
ACCESS = """# p, subject, tenant, model-glob, effect
p, role:engineering, acme, anthropic/claude-*, allow
p, *, acme, openai/gpt-4o-mini, allow
p, role:contractors, acme, anthropic/claude-opus-*, deny
p, *, globex, openai/*, allow
g, alice@acme.com, role:engineering, acme
"""
ROUTES = """# p, tenant, model-glob, key-id[|key-id...]
p, acme, anthropic/*, acme-anthropic
p, *, openai/*, operator-openai
p, *, gemini/*, operator-gemini
"""
LIMITS = "tenant,subject,metric,window,limit\nacme,tenant,usd,month,5000\nacme,*,requests,minute,60\n"
FILES = {"tenants.csv": TENANTS, "policy/access.csv": ACCESS, "policy/routes.csv": ROUTES,
         "policy/limits.csv": LIMITS}
#: The keys of the template deployment: (id, provider, owner tenant or None for the operator). The
#: last two are revoked: a route may name them (they are skipped), and no route has to.
KEYS = [("operator-openai", "openai", None), ("operator-gemini", "gemini", None),
        ("acme-anthropic", "anthropic", "acme"), ("globex-openai", "openai", "globex"),
        ("old-openai", "openai", None)]
REVOKED = ("globex-openai", "old-openai")
SUMMARY = "4 access rules, 1 role links, 3 routes, 2 limits, 2 tenants: 0 error(s), 0 warning(s)"


def add_key(data_dir: Path, key_id: str, provider: str, tenant: str | None) -> None:
    owner = ["--tenant", tenant] if tenant else ["--operator"]
    result = run_cli(data_dir, "keys", "add", key_id, "--provider", provider, *owner, stdin=f"sk-test-{key_id}\n")
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A valid deployment: `tollway init`, the files above, the keys above (one of them revoked)."""
    root = tmp_path_factory.mktemp("validation") / "template"
    assert run_cli(None, "init", str(root)).returncode == 0
    for name, text in FILES.items():
        (root / name).write_text(text)
    for key_id, provider, tenant in KEYS:
        add_key(root, key_id, provider, tenant)
    for key_id in REVOKED:
        assert run_cli(root, "keys", "revoke", key_id).returncode == 0
    return root


@pytest.fixture
def deploy(template, tmp_path) -> Path:
    target = tmp_path / "deploy"
    shutil.copytree(template, target)
    return target


def check(data_dir: Path, capsys) -> tuple[int, list[str], str]:
    """`tollway policy check` in process: (exit code, problem lines on stderr, the summary line)."""
    capsys.readouterr()
    code = cli_main(["--data-dir", str(data_dir), "policy", "check"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[:-1], err[-1]


def test_the_template_is_valid_without_warnings(deploy, capsys):
    code, problems, summary = check(deploy, capsys)
    assert (code, problems) == (0, [])
    assert summary == f"checked {deploy}: {SUMMARY}"  # the summary names the directory it checked


# (test id, {file: new content}, the exact problem lines in output order)
ERRORS = [
    # wrong column count, in every file
    ("access-p-columns", {"policy/access.csv": "p, *, acme, openai/gpt-4o-mini\n"},
     ["policy/access.csv:1: error: p needs 4 fields (subject, tenant, model-glob, effect), got 3"]),
    ("access-p-too-many-columns", {"policy/access.csv": "p, *, acme, openai/gpt-4o-mini, allow, extra\n"},
     ["policy/access.csv:1: error: p needs 4 fields (subject, tenant, model-glob, effect), got 5"]),
    ("access-g-columns", {"policy/access.csv": "# roles\ng, alice@acme.com, role:engineering\n"},
     ["policy/access.csv:2: error: g needs 3 fields (user, role:NAME, tenant), got 2"]),
    ("routes-columns", {"policy/routes.csv": "p, acme, anthropic/*\n"},
     ["policy/routes.csv:1: error: p needs 3 fields (tenant, model-glob, key-id[|key-id...]), got 2"]),
    ("limits-columns", {"policy/limits.csv": "tenant,subject,metric,window,limit\nacme,tenant,usd,month\n"},
     ["policy/limits.csv:2: error: expected 5 columns, got 4"]),
    ("tenants-columns", {"tenants.csv": TENANTS + "initech,Initech,5\n"},
     ["tenants.csv:4: error: expected 4 columns, got 3"]),
    # unknown ptype
    ("access-ptype", {"policy/access.csv": ACCESS + "q, *, acme, openai/gpt-4o, allow\n"},
     ["policy/access.csv:7: error: unknown rule type 'q': use p (permission) or g (role)"]),
    ("routes-ptype", {"policy/routes.csv": "g, acme, openai/*, operator-openai\n"},
     ["policy/routes.csv:1: error: unknown rule type 'g': routes use p lines only"]),
    # empty fields
    ("access-empty-field", {"policy/access.csv": "p, *, acme, , allow\n"},
     ["policy/access.csv:1: error: empty field"]),
    ("access-empty-effect", {"policy/access.csv": "\n\np, *, acme, openai/gpt-4o-mini,\n"},
     ["policy/access.csv:3: error: empty field"]),
    ("g-empty-field", {"policy/access.csv": "g, , role:engineering, acme\n"},
     ["policy/access.csv:1: error: empty field"]),
    ("routes-empty-field", {"policy/routes.csv": "p, acme, , acme-anthropic\n"},
     ["policy/routes.csv:1: error: empty field"]),
    ("limits-empty-field", {"policy/limits.csv": "tenant,subject,metric,window,limit\nacme,,usd,day,5\n"},
     ["policy/limits.csv:2: error: empty field"]),
    # bad globs
    ("glob-bad-characters", {"policy/access.csv": "p, *, acme, openai/gpt[4]o, allow\n"},
     ["policy/access.csv:1: error: bad model glob 'openai/gpt[4]o': use provider/model with * and ? wildcards"]),
    ("glob-without-provider", {"policy/access.csv": "p, *, acme, gpt-4o, allow\n"},
     ["policy/access.csv:1: error: bad model glob 'gpt-4o': models are named provider/model, "
      "e.g. openai/gpt-4o-mini"]),
    ("route-glob-bad", {"policy/routes.csv": "p, *, openai/gpt 4o, operator-openai\n"},
     ["policy/routes.csv:1: error: bad model glob 'openai/gpt 4o': use provider/model with * and ? wildcards"]),
    # unknown effect
    ("unknown-effect", {"policy/access.csv": "p, *, acme, openai/gpt-4o-mini, permit\n"},
     ["policy/access.csv:1: error: unknown effect 'permit': use allow or deny"]),
    ("effect-is-case-sensitive", {"policy/access.csv": "p, *, acme, openai/gpt-4o-mini, Allow\n"},
     ["policy/access.csv:1: error: unknown effect 'Allow': use allow or deny"]),
    # bad subjects and roles
    ("bad-subject", {"policy/access.csv": "p, bob smith, acme, openai/gpt-4o-mini, allow\n"},
     ["policy/access.csv:1: error: subject 'bob smith' is not valid: use a user id, role:NAME or *"]),
    ("g-role-without-prefix", {"policy/access.csv": "g, alice@acme.com, engineering, acme\n"},
     ["policy/access.csv:1: error: role 'engineering' must look like role:NAME"]),
    # a tenant named in a rule but not in tenants.csv, in each file that names tenants
    ("access-unknown-tenant", {"policy/access.csv": ACCESS + "p, *, initech, openai/gpt-4o-mini, allow\n"},
     ["policy/access.csv:7: error: tenant 'initech' is not in tenants.csv"]),
    ("g-unknown-tenant", {"policy/access.csv": "g, alice@acme.com, role:engineering, initech\n"},
     ["policy/access.csv:1: error: tenant 'initech' is not in tenants.csv"]),
    ("routes-unknown-tenant", {"policy/routes.csv": ROUTES + "p, initech, openai/*, operator-openai\n"},
     ["policy/routes.csv:5: error: tenant 'initech' is not in tenants.csv"]),
    ("limits-unknown-tenant", {"policy/limits.csv": LIMITS + "initech,tenant,usd,month,10\n"},
     ["policy/limits.csv:4: error: tenant 'initech' is not in tenants.csv"]),
    ("tenant-removed-from-tenants-csv", {"tenants.csv": "tenant,name,markup_pct,byok_fee_pct\nacme,Acme,0,0\n"},
     ["policy/access.csv:5: error: tenant 'globex' is not in tenants.csv"]),
    # unknown metric / window
    ("unknown-metric", {"policy/limits.csv": LIMITS + "acme,*,dollars,day,5\n"},
     ["policy/limits.csv:4: error: unknown metric 'dollars': use requests, tokens, usd"]),
    ("unknown-window", {"policy/limits.csv": LIMITS + "acme,*,usd,week,5\n"},
     ["policy/limits.csv:4: error: unknown window 'week': use minute, hour, day, month"]),
    # negative, non-numeric or absurd limits: the message says what the metric allows
    ("negative-limit", {"policy/limits.csv": LIMITS + "acme,*,usd,day,-5\n"},
     ["policy/limits.csv:4: error: limit -5 is out of range: a usd limit must be a number >= 0 and at most "
      "1000000000"]),
    ("non-numeric-limit", {"policy/limits.csv": LIMITS + "acme,*,requests,hour,lots\n"},
     ["policy/limits.csv:4: error: limit 'lots' is not a number: a requests limit must be a whole number >= 0 "
      "and at most 1000000000000"]),
    ("nan-limit", {"policy/limits.csv": LIMITS + "acme,*,usd,day,NaN\n"},
     ["policy/limits.csv:4: error: limit 'NaN' is not a number: a usd limit must be a number >= 0 and at most "
      "1000000000"]),
    ("snan-limit", {"policy/limits.csv": LIMITS + "acme,*,tokens,day,sNaN\n"},
     ["policy/limits.csv:4: error: limit 'sNaN' is not a number: a tokens limit must be a whole number >= 0 "
      "and at most 1000000000000"]),
    ("infinite-limit", {"policy/limits.csv": LIMITS + "acme,*,usd,month,Infinity\n"},
     ["policy/limits.csv:4: error: limit 'Infinity' is not a number: a usd limit must be a number >= 0 and at "
      "most 1000000000"]),
    ("huge-usd-limit", {"policy/limits.csv": LIMITS + "acme,*,usd,month,1e400\n"},
     ["policy/limits.csv:4: error: limit 1e400 is out of range: a usd limit must be a number >= 0 and at most "
      "1000000000"]),
    ("usd-limit-a-cent-above-the-maximum", {"policy/limits.csv": LIMITS + "acme,*,usd,month,1000000000.01\n"},
     ["policy/limits.csv:4: error: limit 1000000000.01 is out of range: a usd limit must be a number >= 0 and "
      "at most 1000000000"]),
    ("huge-request-limit", {"policy/limits.csv": LIMITS + "acme,*,requests,day,1000000000001\n"},
     ["policy/limits.csv:4: error: limit 1000000000001 is out of range: a requests limit must be a whole "
      "number >= 0 and at most 1000000000000"]),
    ("huge-token-limit", {"policy/limits.csv": LIMITS + "acme,*,tokens,minute,1e999999\n"},
     ["policy/limits.csv:4: error: limit 1e999999 is out of range: a tokens limit must be a whole number >= 0 "
      "and at most 1000000000000"]),
    ("fractional-request-limit", {"policy/limits.csv": LIMITS + "acme,*,requests,hour,2.5\n"},
     ["policy/limits.csv:4: error: limit 2.5 is not a whole number: a requests limit must be a whole number "
      ">= 0 and at most 1000000000000"]),
    ("limits-header", {"policy/limits.csv": "tenant,who,metric,window,limit\nacme,tenant,usd,month,5\n"},
     ["policy/limits.csv:1: error: header must be tenant,subject,metric,window,limit"]),
    ("tenants-negative-markup", {"tenants.csv": TENANTS + "initech,Initech,-1,0\n"},
     ["tenants.csv:4: error: markup_pct -1 is out of range: it must be a number >= 0 and at most 1000"]),
    ("tenants-huge-markup", {"tenants.csv": TENANTS + "initech,Initech,1e30,0\n"},
     ["tenants.csv:4: error: markup_pct 1e30 is out of range: it must be a number >= 0 and at most 1000"]),
    ("tenants-markup-just-above-the-maximum", {"tenants.csv": TENANTS + "initech,Initech,1000.01,0\n"},
     ["tenants.csv:4: error: markup_pct 1000.01 is out of range: it must be a number >= 0 and at most 1000"]),
    ("tenants-huge-byok-fee", {"tenants.csv": TENANTS + "initech,Initech,10,1e400\n"},
     ["tenants.csv:4: error: byok_fee_pct 1e400 is out of range: it must be a number >= 0 and at most 1000"]),
    ("tenants-infinite-byok-fee", {"tenants.csv": TENANTS + "initech,Initech,10,Infinity\n"},
     ["tenants.csv:4: error: markup_pct and byok_fee_pct must be numbers >= 0, e.g. 10 or 2.5"]),
    ("tenants-nan-markup", {"tenants.csv": TENANTS + "initech,Initech,NaN,0\n"},
     ["tenants.csv:4: error: markup_pct and byok_fee_pct must be numbers >= 0, e.g. 10 or 2.5"]),
]


@pytest.mark.parametrize(("files", "expected"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_each_error_names_file_line_and_reason_and_exits_1(deploy, capsys, files, expected):
    for name, text in files.items():
        (deploy / name).write_text(text)
    code, problems, summary = check(deploy, capsys)
    assert problems == expected
    assert code == 1
    assert summary.endswith(f": {len(expected)} error(s), 0 warning(s)")


WARNINGS = [
    # a model glob that matches no priced model, in access and in routes
    ("access-unpriced-glob", {"policy/access.csv": ACCESS + "p, *, globex, openai/gpt-9*, allow\n"},
     ["policy/access.csv:7: warning: model glob 'openai/gpt-9*' matches no priced model (not in the "
      "price book nor in pricing.csv): its usage would be unpriced"]),
    ("route-unpriced-glob", {"policy/routes.csv": "p, *, openai/gpt-9*, operator-openai\n" + ROUTES},
     ["policy/routes.csv:1: warning: model glob 'openai/gpt-9*' matches no priced model (not in the "
      "price book nor in pricing.csv): its usage would be unpriced"]),
    # duplicates
    ("duplicate-access-rule", {"policy/access.csv": ACCESS + "p,*,acme,openai/gpt-4o-mini,allow\n"},
     ["policy/access.csv:7: warning: duplicate of line 3"]),
    ("duplicate-limit", {"policy/limits.csv": LIMITS + "acme,*,requests,minute,30\n"},
     ["policy/limits.csv:4: warning: same tenant, subject, metric and window as line 3; the tighter limit applies"]),
    # shadowed routes: a later line that can never be the first match
    ("shadowed-route-same-glob", {"policy/routes.csv": ROUTES + "p, acme, openai/*, operator-openai\n"},
     ["policy/routes.csv:5: warning: never used: line 3 (*, openai/*) matches first"]),
    ("shadowed-route-narrower-glob", {"policy/routes.csv": ROUTES + "p, acme, openai/gpt-4o*, operator-openai\n"},
     ["policy/routes.csv:5: warning: never used: line 3 (*, openai/*) matches first"]),
    ("shadowed-route-exact-model", {"policy/routes.csv": "p, *, *, operator-openai\np, globex, gemini/gemini-2.5-pro, "
                                                          "operator-gemini\n"},
     ["policy/routes.csv:0: warning: key 'acme-anthropic' (anthropic, owner acme) is on no route: the gateway "
      "never uses it; name it in a route, or `tollway keys revoke acme-anthropic`",
      "policy/routes.csv:2: warning: never used: line 1 (*, *) matches first"]),
    # an active key that no route names; a tenant allowed a provider that no route serves for it
    ("key-on-no-route", {"policy/routes.csv": "p, acme, anthropic/*, acme-anthropic\np, *, openai/*, operator-openai\n"},
     ["policy/routes.csv:0: warning: key 'operator-gemini' (gemini, owner operator) is on no route: the gateway "
      "never uses it; name it in a route, or `tollway keys revoke operator-gemini`"]),
    ("allowed-provider-without-route", {"policy/access.csv": ACCESS + "p, *, globex, anthropic/claude-haiku-*, allow\n"},
     ["policy/access.csv:7: warning: allows anthropic/claude-haiku-* in tenant globex, but no route in "
      "policy/routes.csv serves anthropic there: those calls get 403 \"No key route\" until a route and its key "
      "are added"]),
    ("rule-for-every-tenant-without-route", {"policy/access.csv": ACCESS + "p, role:admins, *, anthropic/*, allow\n"},
     ["policy/access.csv:7: warning: allows anthropic/* in tenant globex, but no route in policy/routes.csv serves "
      "anthropic there: those calls get 403 \"No key route\" until a route and its key are added"]),
    ("tenant-with-no-route-at-all", {"policy/routes.csv": "p, acme, anthropic/*, acme-anthropic\n"
                                                           "p, acme, openai/*, operator-openai\n"
                                                           "p, acme, gemini/*, operator-gemini\n"},
     ["policy/access.csv:5: warning: allows openai/* in tenant globex, but no route in policy/routes.csv serves "
      "openai there: those calls get 403 \"No key route\" until a route and its key are added"]),
]


@pytest.mark.parametrize(("files", "expected"), [c[1:] for c in WARNINGS], ids=[c[0] for c in WARNINGS])
def test_each_warning_is_printed_and_exits_0(deploy, capsys, files, expected):
    for name, text in files.items():
        (deploy / name).write_text(text)
    code, problems, summary = check(deploy, capsys)
    assert problems == expected
    assert code == 0
    assert summary.endswith(f": 0 error(s), {len(expected)} warning(s)")


def test_access_allow_shadowed_by_a_deny_is_warned(deploy, capsys):
    """The issue: "duplicate or shadowed rules (warning: a later line that can never win)".

    Line 3 denies every OpenAI model to everyone in globex (deny overrides allow), so the allow on
    line 4 (same subject and tenant, a narrower glob) can never win: the governance lead who added
    it believes gpt-4o is now allowed, and nothing tells them it is not.
    """
    (deploy / "policy/access.csv").write_text(
        "# globex\n\np, *, globex, openai/*, deny\np, *, globex, openai/gpt-4o, allow\n")
    code, problems, _ = check(deploy, capsys)
    assert code == 0
    assert len(problems) == 1, problems
    assert problems[0].startswith("policy/access.csv:4: warning: ") and "line 3" in problems[0]


# --- route keys: added, revoked and owned through the real CLI -------------------------------------
def cli_check(data_dir: Path) -> tuple[int, list[str]]:
    result = run_cli(data_dir, "policy", "check")
    return result.returncode, result.stderr.strip().splitlines()[:-1]


def test_route_to_a_missing_key_is_an_error(deploy):
    (deploy / "policy/routes.csv").write_text("p, globex, gemini/*, globex-gemini\n" + ROUTES)
    code, problems = cli_check(deploy)
    assert problems == ["policy/routes.csv:1: error: key 'globex-gemini' does not exist: add it with `tollway keys "
                        "add globex-gemini --provider gemini --tenant globex` (the provider key on stdin), or take "
                        "it out of this route"]
    assert code == 1
    add_key(deploy, "globex-gemini", "gemini", "globex")  # adding it with the CLI fixes the set
    assert cli_check(deploy) == (0, [])


def test_route_to_a_revoked_key_is_a_warning_because_the_pool_skips_it(deploy):
    others = "p, acme, anthropic/*, acme-anthropic\np, *, gemini/*, operator-gemini\n"
    (deploy / "policy/routes.csv").write_text("p, *, openai/*, old-openai|operator-openai\n" + others)
    assert cli_check(deploy) == (0, ["policy/routes.csv:1: warning: key 'old-openai' is revoked; "
                                     "the route skips it"])
    (deploy / "policy/routes.csv").write_text("p, *, openai/*, old-openai\n" + others)
    code, problems = cli_check(deploy)
    assert problems == ["policy/routes.csv:0: warning: key 'operator-openai' (openai, owner operator) is on no "
                        "route: the gateway never uses it; name it in a route, or `tollway keys revoke "
                        "operator-openai`",
                        "policy/routes.csv:1: warning: key 'old-openai' is revoked; the route skips it",
                        "policy/routes.csv:1: warning: no usable key left in this route"]
    assert code == 0


def test_key_revoked_with_the_cli_turns_into_a_warning(deploy):
    assert cli_check(deploy) == (0, [])
    assert run_cli(deploy, "keys", "revoke", "operator-gemini").returncode == 0
    code, problems = cli_check(deploy)
    assert problems == ["policy/routes.csv:4: warning: key 'operator-gemini' is revoked; the route skips it",
                        "policy/routes.csv:4: warning: no usable key left in this route"]
    assert code == 0


def test_a_key_added_on_no_route_is_warned_until_it_is_revoked(deploy):
    add_key(deploy, "spare-openai", "openai", None)
    assert cli_check(deploy) == (0, [
        "policy/routes.csv:0: warning: key 'spare-openai' (openai, owner operator) is on no route: the gateway "
        "never uses it; name it in a route, or `tollway keys revoke spare-openai`"])
    assert run_cli(deploy, "keys", "revoke", "spare-openai").returncode == 0
    assert cli_check(deploy) == (0, [])


def test_a_directory_without_a_deployment_is_named_once(tmp_path):
    """Not one "file is missing" line per file, relative to a directory the output never names."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for target, why in ((tmp_path / "nope", " (no such directory)"), (empty, "")):
        result = run_cli(target, "policy", "check")
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == f"error: no deployment at {target}{why}: run `tollway init {target}` first\n"


def test_route_to_another_tenants_key_is_an_error(deploy):
    (deploy / "policy/routes.csv").write_text("p, acme, openai/gpt-4o, globex-openai|operator-openai\n" + ROUTES
                                              + "p, *, anthropic/*, acme-anthropic\n")
    code, problems = cli_check(deploy)
    assert problems == [
        "policy/routes.csv:1: error: key 'globex-openai' belongs to tenant 'globex'; a route for 'acme' may not use it",
        # a route for every tenant may only use the operator's keys
        "policy/routes.csv:6: error: key 'acme-anthropic' belongs to tenant 'acme'; a route for '*' may not use it",
        "policy/routes.csv:6: warning: no usable key left in this route",
    ]
    assert code == 1


def test_route_to_another_providers_key_is_an_error(deploy):
    (deploy / "policy/routes.csv").write_text("p, *, openai/*, operator-gemini|operator-openai\n"
                                              "p, *, gemini/*, operator-gemini\np, acme, anthropic/*, acme-anthropic\n")
    code, problems = cli_check(deploy)
    assert problems == ["policy/routes.csv:1: error: key 'operator-gemini' is a gemini key, the route is for openai"]
    assert code == 1


def test_second_key_of_a_pool_is_checked_too(deploy):
    (deploy / "policy/routes.csv").write_text("p, acme, anthropic/*, acme-anthropic|ghost-key\n"
                                              "p, *, openai/*, operator-openai\np, *, gemini/*, operator-gemini\n")
    code, problems = cli_check(deploy)
    assert problems == ["policy/routes.csv:1: error: key 'ghost-key' does not exist: add it with `tollway keys add "
                        "ghost-key --provider anthropic --tenant acme` (the provider key on stdin), or take it out "
                        "of this route"]
    assert code == 1


def test_every_problem_of_every_file_is_listed_in_file_and_line_order(deploy):
    (deploy / "policy/access.csv").write_text("p, *, acme, openai/gpt-4o-mini, allow\nx, y\np, *, nowhere, *, allow\n")
    (deploy / "policy/limits.csv").write_text(LIMITS + "acme,*,usd,fortnight,5\nacme,*,usd,day,-1\n")
    (deploy / "tenants.csv").write_text(TENANTS + "acme,Again,0,0\n")
    code, problems = cli_check(deploy)
    assert problems == [
        "policy/access.csv:2: error: unknown rule type 'x': use p (permission) or g (role)",
        "policy/access.csv:3: error: tenant 'nowhere' is not in tenants.csv",
        "policy/limits.csv:4: error: unknown window 'fortnight': use minute, hour, day, month",
        "policy/limits.csv:5: error: limit -1 is out of range: a usd limit must be a number >= 0 "
        "and at most 1000000000",
        "tenants.csv:4: error: tenant 'acme' is listed twice",
    ]
    assert code == 1


def test_warnings_only_exit_0_through_the_real_command(deploy):
    (deploy / "policy/access.csv").write_text(ACCESS + "p, *, acme, openai/gpt-4o-mini, allow\n")
    result = run_cli(deploy, "policy", "check")
    assert result.returncode == 0
    assert "policy/access.csv:7: warning: duplicate of line 3" in result.stderr.splitlines()
    assert result.stderr.strip().splitlines()[-1].endswith("0 error(s), 1 warning(s)")


def test_a_bad_tenants_row_is_reported_once_not_as_a_cascade_of_unknown_tenants(deploy, capsys):
    """acme's row has a bad number: that row is the one problem. Every rule naming acme must not be
    reported as "tenant 'acme' is not in tenants.csv" (it is there, on line 2): ten misleading lines
    bury the real cause, and `/readyz` shows only the first five of them."""
    (deploy / "tenants.csv").write_text("tenant,name,markup_pct,byok_fee_pct\nacme,Acme Corp,zero,0\n"
                                        "globex,Globex Inc,12,0\n")
    code, problems, _ = check(deploy, capsys)
    assert code == 1
    assert problems == ["tenants.csv:2: error: markup_pct and byok_fee_pct must be numbers >= 0, e.g. 10 or 2.5"]


def test_missing_policy_file_is_an_error(deploy, capsys):
    (deploy / "policy/access.csv").unlink()
    code, problems, _ = check(deploy, capsys)
    assert problems == ["policy/access.csv:0: error: file is missing; `tollway init` writes a sample"]
    assert code == 1


# --- the largest numbers allowed load -----------------------------------------------------------------
def test_the_largest_limits_and_percentages_load(deploy, capsys):
    (deploy / "policy/limits.csv").write_text("tenant,subject,metric,window,limit\nacme,tenant,usd,month,1000000000\n"
                                              "acme,*,requests,minute,1000000000000\nglobex,*,tokens,day,1e12\n"
                                              "globex,tenant,usd,day,0\n")
    (deploy / "tenants.csv").write_text("tenant,name,markup_pct,byok_fee_pct\nacme,Acme Corp,1000,1000\n"
                                        "globex,Globex Inc,0,999.99\n")
    code, problems, summary = check(deploy, capsys)
    assert (code, problems) == (0, [])
    assert summary == f"checked {deploy}: " + SUMMARY.replace("2 limits", "4 limits")
    files = load_policy_files(deploy)
    assert [(r.line, r.metric, r.limit) for r in files.limits] == [
        (2, "usd", Decimal("1000000000")), (3, "requests", Decimal("1000000000000")),
        (4, "tokens", Decimal("1000000000000")), (5, "usd", Decimal("0"))]
    assert [(t.tenant, t.markup_pct, t.byok_fee_pct) for t in files.tenants.values()] == [
        ("acme", Decimal("1000"), Decimal("1000")), ("globex", Decimal("0"), Decimal("999.99"))]


# --- a UTF-8 byte-order mark (Excel on Windows writes one) ----------------------------------------------
BOM = b"\xef\xbb\xbf"


def loaded(data_dir: Path) -> tuple:
    """Everything the loader makes of a deployment's files except their hashes (a BOM changes those)."""
    files = load_policy_files(data_dir)
    return files.access, files.roles, files.routes, files.limits, files.tenants, files.problems


@pytest.mark.parametrize("name", list(FILES))
def test_a_bom_opening_a_file_loads_as_if_absent(deploy, capsys, name):
    without = loaded(deploy)
    assert without[:5] != ([], [], [], [], {})
    (deploy / name).write_bytes(BOM + FILES[name].encode())
    assert (deploy / name).read_bytes()[:4] == BOM + FILES[name][:1].encode()
    assert loaded(deploy) == without
    code, problems, summary = check(deploy, capsys)
    assert (code, problems) == (0, [])
    assert summary == f"checked {deploy}: {SUMMARY}"


def test_a_bom_on_every_file_with_crlf_line_ends_through_the_real_command(deploy):
    for name, text in FILES.items():
        (deploy / name).write_bytes(BOM + text.replace("\n", "\r\n").encode())
    result = run_cli(deploy, "policy", "check")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [f"checked {deploy}: {SUMMARY}"]


@pytest.mark.parametrize(("name", "raw", "expected"), [
    # a BOM opening a later line is text like any other: here it spoils that line's first field
    ("policy/access.csv", ACCESS.encode() + BOM + b"p, *, globex, gemini/*, allow\n",
     "policy/access.csv:7: error: unknown rule type '\\ufeffp': use p (permission) or g (role)"),
    ("policy/routes.csv", BOM + ROUTES.encode() + BOM + b"p, *, groq/*, operator-openai\n",
     "policy/routes.csv:5: error: unknown rule type '\\ufeffp': routes use p lines only"),
    # only the first of two BOMs opening the file is dropped
    ("policy/limits.csv", BOM + BOM + LIMITS.encode(),
     "policy/limits.csv:1: error: header must be tenant,subject,metric,window,limit"),
], ids=["access-later-line", "routes-later-line", "limits-two-boms"])
def test_a_bom_anywhere_else_is_not_special(deploy, capsys, name, raw, expected):
    (deploy / name).write_bytes(raw)
    code, problems, _ = check(deploy, capsys)
    assert (code, problems) == (1, [expected])


CASES = """tenant,user,roles,model,expect
acme,alice@acme.com,,anthropic/claude-sonnet-4-5,allow
acme,bob@acme.com,,openai/gpt-4o-mini,allow
acme,dana@acme.com,engineering|contractors,anthropic/claude-opus-4-1,deny
globex,carol@globex.com,,openai/gpt-4o,allow
globex,carol@globex.com,,anthropic/claude-haiku-4-5,deny
"""


@pytest.mark.parametrize("bom", [b"", BOM], ids=["plain", "bom"])
def test_policy_test_reads_a_cases_file_that_opens_with_a_bom(deploy, tmp_path, capsys, bom):
    path = tmp_path / "cases.csv"
    path.write_bytes(bom + CASES.encode())
    capsys.readouterr()
    code = cli_main(["--data-dir", str(deploy), "policy", "test", str(path)])
    out, err = capsys.readouterr()
    assert (code, out, err) == (0, "", "5 cases, 5 passed, 0 failed\n")
