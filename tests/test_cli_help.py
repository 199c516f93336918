"""`tollway --help` and every subcommand's help are complete and agree with the README."""

from __future__ import annotations

import argparse
import re

import pytest

from proxy.cli import build_parser
from tests.helpers import REPO, run_cli


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def all_commands() -> list[tuple[str, ...]]:
    """Every command path, e.g. ("keys", "add")."""
    out = []
    for name, sub in subcommands(build_parser()).items():
        out.append((name,))
        out.extend((name, action) for action in subcommands(sub))
    return out


def readme_commands() -> set[tuple[str, ...]]:
    """Command paths the README's command-line table names (`tollway keys add ...`, `keys rotate`)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Command line"):text.index("## HTTP interface")]
    found = set()
    for cell in re.findall(r"^\| (.+?) \|", table, re.M):
        for phrase in re.findall(r"`(?:tollway )?([a-z][a-z-]*(?: [a-z][a-z-]*)?)", cell):
            found.add(tuple(phrase.split()))
    return found


def test_every_command_of_the_cli_is_in_the_readme():
    documented = readme_commands()
    known = set(all_commands())
    for path in known:
        if len(path) == 2 and (path[0], path[1]) not in documented:
            pytest.fail(f"`tollway {' '.join(path)}` is not in the README's command table")
        if len(path) == 1:
            assert any(p[0] == path[0] for p in documented), f"`tollway {path[0]}` missing from the README"


def test_every_command_the_readme_names_exists():
    known = set(all_commands())
    for path in readme_commands():
        if (path[0],) in known:  # a phrase in backticks that starts with a command name
            assert path in known or len(subcommands(build_parser()._subparsers._group_actions[0].choices[path[0]])) == 0, \
                f"README names `tollway {' '.join(path)}`, which does not exist"


@pytest.mark.parametrize("path", all_commands(), ids=" ".join)
def test_every_command_has_help_with_a_description_of_each_option(path):
    result = run_cli(None, *path, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: tollway {' '.join(path)}")
    for match in re.finditer(r"^  (--[a-z-]+)(.*)$", result.stdout, re.M):
        option, rest = match.groups()
        following = result.stdout[match.end() + 1:].split("\n", 1)[0]
        own_text = rest.strip() and not rest.strip().isupper()
        continued = following.startswith(" " * 10) and not following.strip().startswith("-")
        described = own_text or continued
        assert described, f"`tollway {' '.join(path)} {option}` has no help text"
