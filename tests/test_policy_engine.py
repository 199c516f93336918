"""Access decisions and key routes from the governance lead's CSV files, and their validation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from policy.engine import Policy, model_glob
from policy.files import PolicyFiles, Problem, load_policy_files

REPO = Path(__file__).resolve().parent.parent

TENANTS = """\
tenant,name,markup_pct,byok_fee_pct
acme,Acme Corp,0,2.5
globex,Globex Inc,12,0
initech,Initech,5,1
"""

ACCESS = """\
# p, subject, tenant, model-glob, effect
p, role:engineering, acme, anthropic/claude-*, allow
p, *, acme, openai/gpt-4o-mini, allow
p, role:contractors, acme, anthropic/claude-opus-*, deny
p, bob@acme.com, acme, gemini/gemini-2.?-flash, allow
p, *, globex, openai/*, allow
p, mallory@globex.com, globex, openai/*, deny
p, role:engineering, globex, gemini/*, allow
p, role:platform-admins, *, *, allow
p, *, initech, *sonnet*, allow
p, *, *, openai/text-embedding-3-small, allow
p, eve@initech.com, initech, openai/gpt-4.1, allow

# g, user, role:NAME, tenant
g, alice@acme.com, role:engineering, acme
g, carol@globex.com, role:engineering, globex
g, oscar@acme.com, role:platform-admins, acme
"""
# line numbers of the rules above, for readability of the table below
ENG_CLAUDE, ACME_MINI, CONTRACTOR_OPUS, BOB_FLASH, GLOBEX_OPENAI, MALLORY_DENY = 2, 3, 4, 5, 6, 7
GLOBEX_ENG_GEMINI, ADMINS_ALL, INITECH_SONNET, ALL_EMBED, EVE_41 = 8, 9, 10, 11, 12

ROUTES = """\
# p, tenant, model-glob, key-id[|key-id...]
p, acme, anthropic/*, acme-anthropic-1|acme-anthropic-2|acme-anthropic-3
p, acme, anthropic/claude-opus-*, acme-opus
p, *, openai/gpt-4o-mini, operator-mini
p, *, openai/*, operator-openai
p, globex, openai/*, globex-openai
p, *, gemini/gemini-2.?-flash, operator-flash
p, initech, *, initech-any
p, *, *, operator-fallback | operator-backup
"""


def write_deployment(root: Path, access: str = ACCESS, routes: str = ROUTES, tenants: str = TENANTS,
                     model_conf: bool = True) -> Path:
    (root / "policy").mkdir(parents=True, exist_ok=True)
    (root / "tenants.csv").write_text(tenants, encoding="utf-8")
    (root / "policy" / "access.csv").write_text(access, encoding="utf-8")
    (root / "policy" / "routes.csv").write_text(routes, encoding="utf-8")
    if model_conf:
        shutil.copyfile(REPO / "data" / "policy" / "model.conf", root / "policy" / "model.conf")
    return root


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Policy:
    root = write_deployment(tmp_path_factory.mktemp("deploy"))
    files = load_policy_files(root)
    assert files.errors == []
    return Policy(files, root / "policy" / "model.conf")


A, G, N = "acme", "globex", "initech"
CASES = [
    # tenant, subjects, model, allowed, deciding rule line (None: default deny)
    # default deny
    (A, ("zed@acme.com",), "anthropic/claude-sonnet-4-5", False, None),
    (A, ("zed@acme.com",), "openai/gpt-4o", False, None),
    (A, ("zed@acme.com",), "mistral/mistral-large", False, None),
    (A, (), "openai/gpt-4o", False, None),
    # `*` subject
    (A, ("zed@acme.com",), "openai/gpt-4o-mini", True, ACME_MINI),
    (A, ("zed@acme.com", "role:anything"), "openai/gpt-4o-mini", True, ACME_MINI),
    (A, ("zed@acme.com",), "openai/gpt-4o-mini-2024-07-18", False, None),  # globs are anchored
    # `*` tenant (and `*` subject)
    (A, ("zed@acme.com",), "openai/text-embedding-3-small", True, ALL_EMBED),
    (G, ("zed@globex.com",), "openai/text-embedding-3-small", True, None),
    (N, ("zed@initech.com",), "openai/text-embedding-3-small", True, ALL_EMBED),
    # role via a g line, only in its tenant
    (A, ("alice@acme.com",), "anthropic/claude-sonnet-4-5", True, ENG_CLAUDE),
    (A, ("alice@acme.com",), "anthropic/claude-opus-4-1", True, ENG_CLAUDE),
    (A, ("alice@acme.com",), "anthropic/claude-haiku-4-5", True, ENG_CLAUDE),
    (G, ("alice@acme.com",), "gemini/gemini-2.5-pro", False, None),  # her role link is acme's
    (G, ("carol@globex.com",), "gemini/gemini-2.5-pro", True, GLOBEX_ENG_GEMINI),
    (A, ("carol@globex.com",), "anthropic/claude-sonnet-4-5", False, None),  # her role link is globex's
    (A, ("oscar@acme.com",), "gemini/gemini-2.5-pro", True, ADMINS_ALL),  # g line + `*` tenant rule
    (G, ("oscar@acme.com",), "gemini/gemini-2.5-pro", False, None),  # but only in acme
    # role via the token's subjects
    (A, ("dana@acme.com", "role:engineering"), "anthropic/claude-sonnet-4-5", True, ENG_CLAUDE),
    (A, ("dana@acme.com", "role:engineering"), "openai/gpt-4o", False, None),
    (G, ("dana@acme.com", "role:engineering"), "gemini/gemini-2.5-flash", True, GLOBEX_ENG_GEMINI),
    (A, ("dana@acme.com", "engineering"), "anthropic/claude-sonnet-4-5", False, None),  # needs the role: prefix
    (N, ("root@initech.com", "role:platform-admins"), "gemini/gemini-2.5-pro", True, ADMINS_ALL),
    (G, ("root@globex.com", "role:platform-admins"), "anthropic/claude-opus-4-1", True, ADMINS_ALL),
    # deny overrides allow
    (A, ("dana@acme.com", "role:engineering", "role:contractors"), "anthropic/claude-opus-4-1", False, CONTRACTOR_OPUS),
    (A, ("dana@acme.com", "role:engineering", "role:contractors"), "anthropic/claude-sonnet-4-5", True, ENG_CLAUDE),
    (A, ("dana@acme.com", "role:contractors", "role:platform-admins"), "anthropic/claude-opus-4-5", False,
     CONTRACTOR_OPUS),
    (A, ("dana@acme.com", "role:contractors", "role:platform-admins"), "openai/o3", True, ADMINS_ALL),
    (G, ("mallory@globex.com",), "openai/gpt-4o", False, MALLORY_DENY),
    (G, ("mallory@globex.com",), "openai/text-embedding-3-small", False, MALLORY_DENY),
    (G, ("mallory@globex.com", "role:platform-admins"), "openai/gpt-4o", False, MALLORY_DENY),
    (G, ("mallory@globex.com", "role:engineering"), "gemini/gemini-2.5-flash", True, GLOBEX_ENG_GEMINI),
    (G, ("zed@globex.com",), "openai/gpt-4o", True, GLOBEX_OPENAI),
    # globs: `*` crosses `/`, `?` is exactly one character, other characters are literal
    (G, ("zed@globex.com",), "openai/ft:gpt-4o:acme/custom", True, GLOBEX_OPENAI),
    (G, ("zed@globex.com",), "openai/", True, GLOBEX_OPENAI),
    (G, ("zed@globex.com",), "openaix/gpt-4o", False, None),
    (N, ("zed@initech.com",), "anthropic/claude-sonnet-4-5", True, INITECH_SONNET),
    (N, ("zed@initech.com",), "bedrock/anthropic/claude-sonnet-4-5-v1", True, INITECH_SONNET),
    (N, ("zed@initech.com",), "anthropic/claude-opus-4-1", False, None),
    (A, ("bob@acme.com",), "gemini/gemini-2.5-flash", True, BOB_FLASH),
    (A, ("bob@acme.com",), "gemini/gemini-2.0-flash", True, BOB_FLASH),
    (A, ("bob@acme.com",), "gemini/gemini-2.55-flash", False, None),
    (A, ("bob@acme.com",), "gemini/gemini-2.-flash", False, None),
    (A, ("bob@acme.com",), "gemini/gemini-2.5-flash-lite", False, None),
    (A, ("bob@acme.com",), "gemini/gemini-2./-flash", True, BOB_FLASH),  # `?` matches `/` too: one character
    (N, ("eve@initech.com",), "openai/gpt-4.1", True, EVE_41),
    (N, ("eve@initech.com",), "openai/gpt-451", False, None),  # `.` is literal
    (N, ("eve@initech.com",), "openai/gpt-4.1-mini", False, None),
    # tenant isolation: a rule for one tenant never applies to another
    (G, ("zed@globex.com",), "openai/gpt-4o-mini", True, GLOBEX_OPENAI),
    (N, ("zed@initech.com",), "openai/gpt-4o-mini", False, None),
    (G, ("bob@acme.com",), "gemini/gemini-2.5-flash", False, None),
    (N, ("alice@acme.com",), "anthropic/claude-opus-4-1", False, None),
    (A, ("mallory@globex.com",), "openai/gpt-4o-mini", True, ACME_MINI),  # globex's deny is globex's only
    (A, ("zed@acme.com",), "openai/gpt-4o", False, None),
    (A, ("zed@acme.com",), "anthropic/claude-sonnet-4-5", False, None),  # initech's *sonnet* is initech's
]


@pytest.mark.parametrize("tenant, subjects, model, allowed, rule_line", CASES,
                         ids=[f"{c[0]}-{'+'.join(c[1]) or 'nobody'}-{c[2]}" for c in CASES])
def test_access_truth_table(policy, tenant, subjects, model, allowed, rule_line):
    decision = policy.decide(tenant, subjects, model)
    assert decision.allowed is allowed
    if rule_line is not None:
        assert decision.rule is not None and decision.rule.line == rule_line, decision.rule
        assert decision.rule.effect == ("allow" if allowed else "deny")
    elif not allowed:
        assert decision.rule is None
    # the same answer a second time (decisions are cached)
    assert policy.decide(tenant, subjects, model) == decision


def test_decisions_do_not_depend_on_subject_order(policy):
    a = policy.decide("acme", ("dana@acme.com", "role:contractors", "role:engineering"), "anthropic/claude-opus-4-1")
    b = policy.decide("acme", ("dana@acme.com", "role:engineering", "role:contractors"), "anthropic/claude-opus-4-1")
    assert a.allowed is b.allowed is False


def test_default_model_conf_gives_the_same_decisions(tmp_path, policy):
    root = write_deployment(tmp_path, model_conf=False)
    default = Policy(load_policy_files(root), root / "policy" / "model.conf")
    for tenant, subjects, model, allowed, _ in CASES:
        assert default.decide(tenant, subjects, model).allowed is allowed, (tenant, subjects, model)


def test_g_line_for_any_tenant_applies_in_every_tenant(tmp_path):
    """`*` as a tenant means any (validation accepts it on g lines): the role holds everywhere."""
    access = ("p, role:admins, *, *, allow\n"
              "p, role:eng, acme, openai/*, allow\n"
              "g, alice@acme.com, role:admins, *\n"
              "g, bob@acme.com, role:eng, *\n")
    root = write_deployment(tmp_path, access=access)
    files = load_policy_files(root)
    assert files.errors == []
    pol = Policy(files)
    assert pol.decide("acme", ("alice@acme.com",), "openai/gpt-4o").allowed
    assert pol.decide("globex", ("alice@acme.com",), "gemini/gemini-2.5-pro").allowed
    assert pol.decide("acme", ("bob@acme.com",), "openai/gpt-4o").allowed
    assert not pol.decide("globex", ("bob@acme.com",), "openai/gpt-4o").allowed  # the p line is acme's
    assert not pol.decide("acme", ("zed@acme.com",), "openai/gpt-4o").allowed


def test_g_line_for_any_user_is_honoured_or_refused(tmp_path):
    """`g, *, role:NAME, tenant` must not be accepted and then silently ignored: either every user
    holds the role, or validation refuses the line with file:line."""
    access = "p, role:eng, acme, openai/*, allow\ng, *, role:eng, acme\n"
    files = load_policy_files(write_deployment(tmp_path, access=access))
    if files.errors:
        assert [(p.file, p.line) for p in files.errors] == [("policy/access.csv", 2)]
        return
    assert Policy(files).decide("acme", ("alice@acme.com",), "openai/gpt-4o").allowed


def test_role_inherited_through_another_role(tmp_path):
    access = ("p, role:staff, acme, openai/gpt-4o-mini, allow\n"
              "g, role:engineering, role:staff, acme\n"
              "g, alice@acme.com, role:engineering, acme\n")
    pol = Policy(load_policy_files(write_deployment(tmp_path, access=access)))
    assert pol.decide("acme", ("alice@acme.com",), "openai/gpt-4o-mini").allowed
    assert pol.decide("acme", ("dana@acme.com", "role:engineering"), "openai/gpt-4o-mini").allowed
    assert not pol.decide("acme", ("dana@acme.com",), "openai/gpt-4o-mini").allowed


def test_shipped_sample_policy(tmp_path):
    files = load_policy_files(REPO / "data")
    assert files.errors == []
    sample = Policy(files, REPO / "data" / "policy" / "model.conf")
    assert sample.decide("acme", ("alice@acme.com",), "anthropic/claude-sonnet-4-5").allowed
    assert not sample.decide("acme", ("bob@acme.com",), "anthropic/claude-sonnet-4-5").allowed
    assert sample.decide("acme", ("bob@acme.com",), "openai/gpt-4o-mini").allowed
    assert not sample.decide("acme", ("dana@acme.com", "role:engineering", "role:contractors"),
                             "anthropic/claude-opus-4-1").allowed
    assert sample.decide("globex", ("carol@globex.com",), "gemini/gemini-2.5-flash").allowed


def test_empty_access_file_denies_everything(tmp_path):
    root = write_deployment(tmp_path, access="# nothing allowed yet\n\n")
    empty = Policy(load_policy_files(root))
    assert not empty.decide("acme", ("alice@acme.com", "role:platform-admins"), "openai/gpt-4o-mini").allowed


# --- routes ---------------------------------------------------------------------------------------------
ROUTE_CASES = [
    # tenant, model, route line, key pool in order
    ("acme", "anthropic/claude-sonnet-4-5", 2, ("acme-anthropic-1", "acme-anthropic-2", "acme-anthropic-3")),
    ("acme", "anthropic/claude-opus-4-1", 2, ("acme-anthropic-1", "acme-anthropic-2", "acme-anthropic-3")),
    ("acme", "openai/gpt-4o-mini", 4, ("operator-mini",)),
    ("globex", "openai/gpt-4o-mini", 4, ("operator-mini",)),
    ("acme", "openai/gpt-4o", 5, ("operator-openai",)),
    ("globex", "openai/gpt-4o", 5, ("operator-openai",)),  # the `*` line comes first in the file
    ("acme", "gemini/gemini-2.5-flash", 7, ("operator-flash",)),
    ("acme", "gemini/gemini-2.5-pro", 9, ("operator-fallback", "operator-backup")),
    ("initech", "gemini/gemini-2.5-flash", 7, ("operator-flash",)),
    ("initech", "gemini/gemini-2.5-pro", 8, ("initech-any",)),
    ("initech", "openai/gpt-4o", 5, ("operator-openai",)),
    ("globex", "anthropic/claude-sonnet-4-5", 9, ("operator-fallback", "operator-backup")),
]


@pytest.mark.parametrize("tenant, model, line, keys", ROUTE_CASES, ids=[f"{c[0]}-{c[1]}" for c in ROUTE_CASES])
def test_first_matching_route_in_file_order_wins(policy, tenant, model, line, keys):
    route = policy.decide(tenant, ("someone",), model).route
    assert route is not None
    assert (route.line, route.key_ids) == (line, keys)
    # the route does not depend on who asks or whether access is allowed
    assert policy.decide(tenant, ("other", "role:platform-admins"), model).route == route


def route(pol: Policy, tenant: str, model: str):
    return pol.decide(tenant, ("someone",), model).route


def test_route_missing_when_nothing_matches(tmp_path):
    root = write_deployment(tmp_path, routes="p, acme, openai/*, acme-openai\n")
    only = Policy(load_policy_files(root))
    assert route(only, "globex", "openai/gpt-4o") is None
    assert route(only, "acme", "anthropic/claude-sonnet-4-5") is None
    assert only.decide("acme", ("x",), "gemini/gemini-2.5-flash").route is None
    assert route(only, "acme", "openai/gpt-4o").key_ids == ("acme-openai",)


def test_reordering_routes_changes_the_winner(tmp_path):
    root = write_deployment(tmp_path, routes="p, globex, openai/*, globex-openai\np, *, openai/*, operator-openai\n")
    reordered = Policy(load_policy_files(root))
    assert route(reordered, "globex", "openai/gpt-4o").key_ids == ("globex-openai",)
    assert route(reordered, "acme", "openai/gpt-4o").key_ids == ("operator-openai",)


def test_route_with_the_same_pool_on_two_lines_keeps_the_first(tmp_path):
    root = write_deployment(tmp_path, routes="p, acme, openai/gpt-4o, k1\np, acme, openai/*, k1\n")
    pol = Policy(load_policy_files(root))
    assert route(pol, "acme", "openai/gpt-4o").line == 1
    assert route(pol, "acme", "openai/o3").line == 2


# --- globs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, glob, expected", [
    ("openai/gpt-4o-mini", "*", True),
    ("anthropic/claude-sonnet-4-5", "*", True),
    ("openai/gpt-4o-mini", "openai/*", True),
    ("openai/a/b/c", "openai/*", True),
    ("anthropic/claude-sonnet-4-5", "openai/*", False),
    ("anthropic/claude-sonnet-4-5", "*sonnet*", True),
    ("openai/gpt-4o", "*mini", False),
    ("openai/gpt-4o-mini", "*mini", True),
    ("openai/o3", "openai/o?", True),
    ("openai/o30", "openai/o?", False),
    ("openai/o", "openai/o?", False),
    ("openai/gpt-4.1", "openai/gpt-4.1", True),
    ("openai/gpt-401", "openai/gpt-4.1", False),
    ("openai/gpt-4o-mini", "OPENAI/*", False),
    ("openai/gpt-4o-mini\n", "openai/gpt-4o-mini", False),
    ("x+y/(z)", "x+y/(z)", True),
])
def test_model_glob(name, glob, expected):
    assert model_glob(name, glob) is expected


# --- validation ---------------------------------------------------------------------------------------------
ACCESS_HEAD = "# header comment\np, *, acme, openai/gpt-4o-mini, allow\n\n"  # the bad line is line 4
ROUTES_HEAD = "# header comment\np, *, openai/*, operator-openai\n\n"


@pytest.mark.parametrize("line, words", [
    ("p, *, acme, openai/*", "4 fields"),
    ("p, *, acme, openai/*, allow, extra", "4 fields"),
    ("p", "4 fields"),
    ("g, alice@acme.com, role:engineering", "3 fields"),
    ("g, alice@acme.com, role:engineering, acme, extra", "3 fields"),
    ("x, *, acme, openai/*, allow", "unknown rule type"),
    ("P, *, acme, openai/*, allow", "unknown rule type"),
    ("p2, *, acme, openai/*, allow", "unknown rule type"),
    ("p, , acme, openai/*, allow", "empty field"),
    ("p, *, , openai/*, allow", "empty field"),
    ("p, *, acme, , allow", "empty field"),
    ("p, *, acme, openai/*, ", "empty field"),
    ("g, , role:engineering, acme", "empty field"),
    ("p, *, acme, openai/*, permit", "unknown effect"),
    ("p, *, acme, openai/*, Allow", "unknown effect"),
    ("p, *, acme, openai/gpt[4]o, allow", "bad model glob"),
    ("p, *, acme, openai/gpt 4o, allow", "bad model glob"),
    ("p, *, acme, gpt-4o-mini, allow", "bad model glob"),
    ("p, *, acme, openai/gpt-4o|x, allow", "bad model glob"),
    ("p, *, umbrella, openai/*, allow", "not in tenants.csv"),
    ("p, *, Acme, openai/*, allow", "not in tenants.csv"),
    ("g, alice@acme.com, role:engineering, umbrella", "not in tenants.csv"),
    ("g, alice@acme.com, engineering, acme", "role:NAME"),
    ("g, alice@acme.com, role:eng ineering, acme", "role:NAME"),
    ("g, alice@acme.com, admin:engineering, acme", "role:NAME"),
    ("p, alice smith, acme, openai/*, allow", "subject"),
    ("g, alice/acme, role:engineering, acme", "subject"),
])
def test_access_problem_names_file_and_line(tmp_path, line, words):
    root = write_deployment(tmp_path, access=ACCESS_HEAD + line + "\np, *, globex, openai/*, allow\n")
    files = load_policy_files(root)
    assert [(p.file, p.line, p.severity) for p in files.errors] == [("policy/access.csv", 4, "error")], files.errors
    assert words in files.errors[0].message
    assert str(files.errors[0]).startswith("policy/access.csv:4: error: ")
    assert [r.line for r in files.access] == [2, 5]  # the good lines still parse
    with pytest.raises(ValueError):
        Policy(files)


@pytest.mark.parametrize("line, words", [
    ("p, acme, openai/*", "3 fields"),
    ("p, acme, openai/*, k1, k2", "3 fields"),
    ("g, alice, role:x, acme", "unknown rule type"),
    ("p, umbrella, openai/*, k1", "not in tenants.csv"),
    ("p, acme, gpt-4o, k1", "bad model glob"),
    ("p, acme, openai/*, ", "empty field"),
    ("p, acme, openai/*, k1||k2", "not valid"),
    ("p, acme, openai/*, key one", "not valid"),
])
def test_route_problem_names_file_and_line(tmp_path, line, words):
    root = write_deployment(tmp_path, routes=ROUTES_HEAD + line + "\n")
    files = load_policy_files(root)
    assert [(p.file, p.line) for p in files.errors] == [("policy/routes.csv", 4)], files.errors
    assert words in files.errors[0].message
    with pytest.raises(ValueError):
        Policy(files)


@pytest.mark.parametrize("tenants, line, words", [
    ("tenant,name,markup\nacme,Acme,0\n", 1, "header"),
    ("tenant,name,markup_pct,byok_fee_pct\nacme,Acme,0\n", 2, "4 columns"),
    ("tenant,name,markup_pct,byok_fee_pct\nacme,Acme,-1,0\n", 2, "a number >= 0 and at most 1000"),
    ("tenant,name,markup_pct,byok_fee_pct\nacme,Acme,ten,0\n", 2, "numbers >= 0"),
    ("tenant,name,markup_pct,byok_fee_pct\nac me,Acme,0,0\n", 2, "tenant id"),
    ("tenant,name,markup_pct,byok_fee_pct\n*,Any,0,0\n", 2, "tenant id"),
    ("# tenants\ntenant,name,markup_pct,byok_fee_pct\nacme,Acme,0,0\nacme,Again,1,1\n", 4, "twice"),
])
def test_tenants_problem_names_file_and_line(tmp_path, tenants, line, words):
    root = write_deployment(tmp_path, tenants=tenants, access="p, *, *, openai/*, allow\n", routes="")
    files = load_policy_files(root)
    assert [(p.file, p.line) for p in files.errors] == [("tenants.csv", line)], files.errors
    assert words in files.errors[0].message


def test_every_bad_line_is_reported_not_only_the_first(tmp_path):
    access = ("p, *, acme, openai/*\n"           # 1
              "p, *, acme, openai/*, allow\n"    # 2 good
              "q, *, acme, openai/*, allow\n"    # 3
              "# comment\n"                      # 4
              "p, *, nowhere, openai/*, allow\n" # 5
              "g, bob, engineering, acme\n")     # 6
    root = write_deployment(tmp_path, access=access, routes="p, acme, openai/*, ok\np, nowhere, openai/*, k\n")
    files = load_policy_files(root)
    assert [(p.file, p.line) for p in files.errors] == [
        ("policy/access.csv", 1), ("policy/access.csv", 3), ("policy/access.csv", 5), ("policy/access.csv", 6),
        ("policy/routes.csv", 2)]


@pytest.mark.parametrize("missing", ["tenants.csv", "policy/access.csv", "policy/routes.csv"])
def test_missing_file_is_an_error(tmp_path, missing):
    root = write_deployment(tmp_path)
    (root / missing).unlink()
    files = load_policy_files(root)
    assert any(p.file == missing for p in files.errors), files.problems
    with pytest.raises(ValueError):
        Policy(files)


def test_policy_refuses_files_with_errors():
    files = PolicyFiles(problems=[Problem("policy/access.csv", 3, "unknown effect 'permit'")])
    with pytest.raises(ValueError):
        Policy(files)


def test_policy_accepts_files_with_only_warnings():
    files = PolicyFiles(problems=[Problem("pricing.csv", 0, "file is missing", "warning")])
    assert not Policy(files).decide("acme", ("a",), "openai/gpt-4o").allowed
