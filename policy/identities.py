"""`policy/identities.csv`: which tenant, user and roles a machine's (or person's) JWT acts as.

    # issuer-name, claim, value-glob, tenant, user, roles
    github, sub, repo:acme/payments-*:ref:refs/heads/main, acme, ci:payments, ci
    k8s, sub, system:serviceaccount:billing:*, acme, svc:billing, svc

`issuer-name` is the `name` of an `[[auth.issuers]]` entry; `claim` a claim of the token; `value-glob`
matches that claim's value (`*` any run of characters, `/` and `:` included; `?` one character; a list
claim such as `groups` matches when one of its items does). The first matching line wins. `user` may be
empty: the token's `user_claim` then names the user. `roles` are `|`-separated and may be empty.
The file is optional.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from policy.files import PolicyFiles, Problem, glob_regex

FILE = "policy/identities.csv"
HEADER = ["issuer-name", "claim", "value-glob", "tenant", "user", "roles"]
_ISSUER = re.compile(r"^[A-Za-z0-9_\-]+$")
_CLAIM = re.compile(r"^[A-Za-z0-9_.:\-/]+$")
_NAME = re.compile(r"^[A-Za-z0-9._@:\-]+$")


@dataclass(frozen=True, slots=True)
class IdentityRule:
    line: int
    issuer: str  # an [[auth.issuers]] entry's name
    claim: str
    value_glob: str
    tenant: str
    user: str  # "": the issuer entry's user_claim names the user
    roles: tuple[str, ...]

    def matches(self, issuer: str, claims: dict) -> bool:
        return issuer == self.issuer and any(glob_regex(self.value_glob).match(v)
                                             for v in claim_values(claims.get(self.claim)))

    def as_row(self) -> str:
        return ", ".join((self.issuer, self.claim, self.value_glob, self.tenant, self.user, "|".join(self.roles)))


def claim_values(value: object) -> list[str]:
    """A claim's value(s) as strings to match: a string, a number, or the strings and numbers of a list."""
    items = value if isinstance(value, list) else [value]
    return [str(v).lower() if isinstance(v, bool) else str(v) for v in items
            if isinstance(v, str | int | float)]


def first_match(rules: Iterable[IdentityRule], issuer: str, claims: dict) -> IdentityRule | None:
    """The first line of the file that matches a token of `issuer` with these claims."""
    return next((rule for rule in rules if rule.matches(issuer, claims)), None)


def load_identities(path: Path, files: PolicyFiles, read) -> None:
    """Parse the file into `files.identities`, noting problems with their line; a missing file is fine."""
    if not path.exists():
        return
    rows = read(path, files.problems)
    if rows and [f.lower() for f in rows[0][1]] == HEADER:
        rows = rows[1:]
    for line, fields in rows:
        rule = _rule(line, fields, files)
        if rule is not None:
            files.identities.append(rule)
    _warn_shadowed(files)


def _rule(line: int, fields: list[str], files: PolicyFiles) -> IdentityRule | None:
    if len(fields) != 6:
        files.problems.append(Problem(FILE, line, f"expected 6 fields (issuer-name, claim, value-glob, tenant, user, "
                                                  f"roles), got {len(fields)}"))
        return None
    issuer, claim, glob, tenant, user, roles = fields
    role_list = tuple(r.strip() for r in roles.split("|") if r.strip())
    problem = (_check(issuer, _ISSUER, "issuer-name", "the name of an [[auth.issuers]] entry, e.g. github")
               or _check(claim, _CLAIM, "claim", "a claim name, e.g. sub")
               or (None if glob and glob.isprintable() else "value-glob must not be empty, e.g. repo:acme/*")
               or _tenant(tenant, files)
               or (None if not user or _NAME.match(user) else
                   f"user {user!r} may only hold letters, digits and . _ @ : - (or leave it empty: the token's "
                   "user claim then names the user)")
               or next((f"role {r!r} may only hold letters, digits and . _ @ : -" for r in role_list
                        if not _NAME.match(r)), None))
    if problem:
        files.problems.append(Problem(FILE, line, problem))
        return None
    return IdentityRule(line, issuer, claim, glob, tenant, user, role_list)


def _check(value: str, pattern: re.Pattern[str], what: str, example: str) -> str | None:
    return None if pattern.match(value) else f"{what} {value!r} is not valid: use {example}"


def _tenant(tenant: str, files: PolicyFiles) -> str | None:
    if tenant in files.tenants:
        return None
    return f"tenant {tenant!r} is not in tenants.csv (an identity acts in one named tenant, never *)"


def _warn_shadowed(files: PolicyFiles) -> None:
    """A line that an earlier one always matches first (same issuer and claim, wider glob) never applies."""
    from policy.files import glob_covers

    for index, rule in enumerate(files.identities):
        earlier = next((e for e in files.identities[:index] if (e.issuer, e.claim) == (rule.issuer, rule.claim)
                        and glob_covers(e.value_glob, rule.value_glob)), None)
        if earlier is not None:
            files.problems.append(Problem(FILE, rule.line, f"never applies: line {earlier.line} matches every token "
                                                           "this line matches, and the first match wins", "warning"))


def unknown_issuer_warnings(rules: Iterable[IdentityRule], issuers: Iterable[str]) -> list[Problem]:
    """Lines naming an issuer that `tollway.toml` does not trust: they can never match."""
    known = set(issuers)
    return [Problem(FILE, rule.line, f"issuer {rule.issuer!r} is not an [[auth.issuers]] entry of tollway.toml "
                                     f"(known: {', '.join(sorted(known)) or 'none'}): this line never matches",
                    "warning")
            for rule in rules if rule.issuer not in known]
