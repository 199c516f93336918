"""`tollway policy …`: check the governance files."""

from __future__ import annotations

import argparse
import sys

from policy.files import load_policy_files
from proxy.metering import load_pricebook
from proxy.settings import resolve_data_dir


def cmd_check(args: argparse.Namespace) -> int:
    data_dir = resolve_data_dir(args.data_dir)
    files = load_policy_files(data_dir)
    _, price_problems = load_pricebook(data_dir / "pricing.csv")
    problems = files.problems + price_problems
    for problem in problems:
        print(problem, file=sys.stderr)
    errors = [p for p in problems if p.severity == "error"]
    summary = (f"{len(files.access)} access rules, {len(files.roles)} role links, {len(files.routes)} routes, "
               f"{len(files.tenants)} tenants: {len(errors)} error(s), {len(problems) - len(errors)} warning(s)")
    print(summary, file=sys.stderr)
    return 1 if errors else 0


def register(commands, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    policy = commands.add_parser("policy", parents=[common], help="check the policy files")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    actions.add_parser("check", parents=[common], help="validate every policy file; exit 1 on errors"
                       ).set_defaults(func=cmd_check)
