"""`tollway policy test FILE`: a CSV truth table of expected decisions, run against the policy.

    tenant,user,roles,model,expect
    acme,alice@acme.com,engineering,anthropic/claude-sonnet-4-5,allow
    acme,dana@acme.com,engineering|contractors,anthropic/claude-opus-4-1,deny

`roles` are the credential's roles, `|`-separated (may be empty); `expect` is allow or deny.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from policy.engine import Policy
from policy.files import Problem, csv_lines

HEADER = ["tenant", "user", "roles", "model", "expect"]


@dataclass(frozen=True)
class CaseResult:
    line: int
    tenant: str
    user: str
    roles: tuple[str, ...]
    model: str
    expected: str
    actual: str
    rule_line: int | None

    @property
    def passed(self) -> bool:
        return self.expected == self.actual


def run_cases(policy: Policy, path: Path) -> tuple[list[CaseResult], list[Problem]]:
    rows = csv_lines(path)
    name = path.name
    if not rows or rows[0][1] != HEADER:
        return [], [Problem(name, rows[0][0] if rows else 0, "header must be " + ",".join(HEADER))]
    results, problems = [], []
    for line, fields in rows[1:]:
        if len(fields) != 5:
            problems.append(Problem(name, line, f"expected 5 columns, got {len(fields)}"))
            continue
        tenant, user, roles, model, expect = fields
        if expect not in ("allow", "deny"):
            problems.append(Problem(name, line, f"expect must be allow or deny, got {expect!r}"))
            continue
        role_list = tuple(r.strip() for r in roles.split("|") if r.strip())
        subjects = (user, *(f"role:{r}" for r in role_list))
        decision = policy.decide(tenant, subjects, model)
        rule = policy.deciding_rule(tenant, subjects, model)
        results.append(CaseResult(line, tenant, user, role_list, model, expect,
                                  "allow" if decision.allowed else "deny", rule.line if rule else None))
    return results, problems
