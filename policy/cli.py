"""`tollway policy …`: check, explain and test the governance files (fast enough for a pre-commit hook)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from policy.files import set_hash
from policy.loader import PolicyInvalid, check_policy_set, load_policy_set
from proxy.settings import resolve_data_dir


def _keys(data_dir: Path):
    """The provider keys (no secrets) for the route checks, or None when there is no control store yet."""
    from proxy.control import ControlStore, control_target, is_postgres
    from proxy.crypto import Keyring, SecretError, load_master_key

    try:
        target = control_target(data_dir)
    except ValueError:  # tollway.toml unreadable: `policy check` reports it; the default store serves here
        target = data_dir / "control.db"
    if not is_postgres(target) and not target.exists():
        return None
    try:
        store = ControlStore(target, Keyring(load_master_key(data_dir)))
    except SecretError:
        return None
    try:
        return {k.key_id: k for k in store.list_keys()}
    finally:
        store.close()


def _load(data_dir: Path, keys):
    try:
        return load_policy_set(data_dir, keys)
    except PolicyInvalid as exc:
        print(f"error: {exc}\n(`tollway policy check` lists every problem)", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    data_dir = resolve_data_dir(args.data_dir)
    files, _, problems = check_policy_set(data_dir, _keys(data_dir))
    problems = sorted(problems + _issuer_warnings(data_dir, files), key=lambda p: (p.file, p.line, p.severity))
    for problem in problems:
        print(problem, file=sys.stderr)
    errors = [p for p in problems if p.severity == "error"]
    print(f"checked {data_dir}: {len(files.access)} access rules, {len(files.roles)} role links, "
          f"{len(files.routes)} routes, {len(files.limits)} limits, {len(files.tenants)} tenants: "
          f"{len(errors)} error(s), {len(problems) - len(errors)} warning(s)", file=sys.stderr)
    # The files on disk, byte for byte: compare with a gateway's /readyz policy_hash or `tollway status`.
    print(f"policy hash {set_hash(files.hashes)}")
    return 1 if errors else 0


def _issuer_warnings(data_dir: Path, files) -> list:
    """identities.csv lines naming an issuer tollway.toml does not trust (none when tollway.toml is unreadable)."""
    from policy.identities import unknown_issuer_warnings
    from proxy.settings import SettingsError, load_settings

    if not files.identities:
        return []
    try:
        issuers = load_settings(data_dir).auth.issuers
    except SettingsError:
        return []
    return unknown_issuer_warnings(files.identities, [entry.name for entry in issuers])


def cmd_explain(args: argparse.Namespace) -> int:
    from policy.explain import explain, explain_operation, render

    problem = _explain_usage(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    data_dir = resolve_data_dir(args.data_dir)
    keys = _keys(data_dir)
    policies = _load(data_dir, keys)
    if policies is None:
        return 1
    identity = None
    if args.jwt:
        identity = _jwt_identity(data_dir, policies, args.jwt)
        if identity is None:
            return 1
        args.tenant, args.user, args.role = identity.tenant, identity.user, identity.roles
    roles = args.role or []
    mapped = identity is None or identity.refusal is None
    operation = (explain_operation(policies, args.tenant, args.user, roles, args.operation)
                 if args.operation and mapped else None)
    result = explain(policies, keys, args.tenant, args.user, roles, args.model) if args.model and mapped else None
    if args.json:
        document = result.as_json() if result else {"tenant": args.tenant, "user": args.user, "roles": roles}
        document |= {"operation": operation.as_json()} if operation else {}
        print(json.dumps(({"identity": identity.as_json()} if identity else {}) | document, indent=2))
    else:
        lines = identity.render() if identity else []
        if mapped:
            lines += [render(result)] if result else [f"{args.user} in tenant {args.tenant}:"]
        print("\n".join(lines + (operation.render() if operation else [])))
    return 0


def _explain_usage(args: argparse.Namespace) -> str | None:
    """Why these flags cannot be explained (a usage error), or None."""
    for flag, value, example in (("--model", args.model, "openai/gpt-4o-mini"),
                                 ("--operation", args.operation, "openai/files.create")):
        if value is not None and "/" not in value:
            return f"{flag} {value!r}: name it provider/..., e.g. {example}"
    if args.model is None and args.operation is None:
        return "give --model, --operation or both"
    if args.jwt and (args.tenant or args.user or args.role):
        return "--jwt names the tenant, user and roles itself: leave out --tenant, --user and --role"
    if not args.jwt and not (args.tenant and args.user):
        return "give --tenant and --user (and --role), or --jwt FILE"
    return None


def _jwt_identity(data_dir: Path, policies, jwt_file: str):
    """How the JWT in `jwt_file` maps (policy.explain.IdentityExplanation), or None after printing why not."""
    from policy.explain import explain_identity
    from proxy.settings import SettingsError, load_settings

    try:
        token = Path(jwt_file).read_text(encoding="utf-8").strip()
        return explain_identity(policies, load_settings(data_dir).auth.issuers, token)
    except OSError as exc:
        print(f"error: cannot read the JWT from {jwt_file}: {exc.strerror or exc}", file=sys.stderr)
    except (SettingsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return None


def cmd_test(args: argparse.Namespace) -> int:
    from policy.cases import run_cases

    data_dir = resolve_data_dir(args.data_dir)
    policies = _load(data_dir, _keys(data_dir))
    if policies is None:
        return 1
    path = Path(args.file)
    if not path.exists():
        print(f"error: no file {path}", file=sys.stderr)
        return 1
    results, problems = run_cases(policies.policy, path, _identity_mapper(data_dir, policies))
    for problem in problems:
        print(problem)
    failed = [r for r in results if not r.passed]
    for r in failed:
        called = " ".join(part for part in (r.model, r.operation) if part)
        who = f"{r.issuer} token as " if r.issuer else ""
        print(f"{path.name}:{r.line}: FAIL {who}{r.tenant} {r.user} [{'|'.join(r.roles)}] {called}: "
              f"expected {r.expected}, got {r.actual} ({r.rule})")
    print(f"{len(results)} cases, {len(results) - len(failed)} passed, {len(failed)} failed", file=sys.stderr)
    return 1 if failed or problems else 0


def _identity_mapper(data_dir: Path, policies):
    """Maps (issuer name, claims) as the gateway does, for identity cases (policy.cases.Mapper)."""
    from proxy.errors import Unauthenticated
    from proxy.identity_map import IdentityNotMapped, map_identity
    from proxy.settings import SettingsError, load_settings

    try:
        issuers = {entry.name: entry for entry in load_settings(data_dir).auth.issuers}
    except SettingsError:
        issuers = {}

    def mapper(name: str, claims: dict):
        try:
            identity, rule = map_identity(issuers[name], claims, policies.files.identities)
        except IdentityNotMapped:
            return None
        except Unauthenticated as exc:
            raise ValueError(f"the gateway would refuse these claims (401): {exc.message}") from exc
        where = f"policy/identities.csv:{rule.line}" if rule else "the issuer entry"
        return identity.tenant, identity.user, identity.roles, where
    return mapper


def register(commands, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    policy = commands.add_parser("policy", parents=[common], help="check, explain and test the policy files")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    actions.add_parser("check", parents=[common], help="validate every policy file; exit 1 on errors"
                       ).set_defaults(func=cmd_check)
    explain = actions.add_parser("explain", parents=[common, as_json],
                                 help="the decision, matching rules, key route, billing mode and limits")
    explain.add_argument("--tenant", help="the tenant the request would come from")
    explain.add_argument("--user", help="the user id, as on the token or in the JWT")
    explain.add_argument("--role", action="append", help="a role the credential carries (repeatable)")
    explain.add_argument("--model", help="provider/model, e.g. anthropic/claude-sonnet-4-5")
    explain.add_argument("--operation", help="provider/operation, e.g. openai/files.create (policy/operations.csv)")
    explain.add_argument("--jwt", metavar="FILE", help="a JWT (in FILE) instead of --tenant/--user/--role: which "
                         "policy/identities.csv line maps it, then the decision (its signature is not checked)")
    explain.set_defaults(func=cmd_explain)
    test = actions.add_parser("test", parents=[common],
                              help="run a CSV of expected decisions (tenant,user,roles,model,expect; "
                                   "issuer,claims,... for identity rules)")
    test.add_argument("file")
    test.set_defaults(func=cmd_test)
