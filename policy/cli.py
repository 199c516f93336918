"""`tollway policy …`: check the governance files."""

from __future__ import annotations

import argparse
import sys

from policy.loader import check_policy_set
from proxy.settings import resolve_data_dir


def cmd_check(args: argparse.Namespace) -> int:
    data_dir = resolve_data_dir(args.data_dir)
    files, _, problems = check_policy_set(data_dir, _keys(data_dir))
    for problem in problems:
        print(problem, file=sys.stderr)
    errors = [p for p in problems if p.severity == "error"]
    summary = (f"{len(files.access)} access rules, {len(files.roles)} role links, {len(files.routes)} routes, "
               f"{len(files.tenants)} tenants: {len(errors)} error(s), {len(problems) - len(errors)} warning(s)")
    print(summary, file=sys.stderr)
    return 1 if errors else 0


def _keys(data_dir):
    """The provider keys (no secrets) for the route checks, or None when there is no control.db yet."""
    from proxy.control import ControlStore
    from proxy.crypto import Keyring, SecretError, load_master_key

    if not (data_dir / "control.db").exists():
        return None
    try:
        store = ControlStore(data_dir / "control.db", Keyring(load_master_key(data_dir)))
    except SecretError:
        return None
    try:
        return {k.key_id: k for k in store.list_keys()}
    finally:
        store.close()


def register(commands, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    policy = commands.add_parser("policy", parents=[common], help="check the policy files")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    actions.add_parser("check", parents=[common], help="validate every policy file; exit 1 on errors"
                       ).set_defaults(func=cmd_check)
