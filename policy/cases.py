"""`tollway policy test FILE`: a CSV truth table of expected decisions, run against the policy.

    tenant,user,roles,model,expect
    acme,alice@acme.com,engineering,anthropic/claude-sonnet-4-5,allow
    acme,dana@acme.com,engineering|contractors,anthropic/claude-opus-4-1,deny

`roles` are the credential's roles, `|`-separated (may be empty); `expect` is allow or deny. With an
`operation` column before `expect` (`tenant,user,roles,model,operation,expect`) a case checks
policy/operations.csv too: it is allowed when the operation is and (if `model` is not empty) the model is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from policy.engine import Policy
from policy.files import Problem, csv_lines

HEADER = ["tenant", "user", "roles", "model", "expect"]
HEADER_WITH_OPERATION = ["tenant", "user", "roles", "model", "operation", "expect"]


@dataclass(frozen=True)
class CaseResult:
    line: int
    tenant: str
    user: str
    roles: tuple[str, ...]
    model: str
    expected: str
    actual: str
    rule: str  # the rule that decided, as file:line, or "default deny"
    operation: str = ""

    @property
    def passed(self) -> bool:
        return self.expected == self.actual


def run_cases(policy: Policy, path: Path) -> tuple[list[CaseResult], list[Problem]]:
    rows = csv_lines(path)
    name = path.name
    header = rows[0][1] if rows else None
    if header not in (HEADER, HEADER_WITH_OPERATION):
        return [], [Problem(name, rows[0][0] if rows else 0,
                            f"header must be {','.join(HEADER)} or {','.join(HEADER_WITH_OPERATION)}")]
    results, problems = [], []
    for line, fields in rows[1:]:
        if len(fields) != len(header):
            problems.append(Problem(name, line, f"expected {len(header)} columns, got {len(fields)}"))
            continue
        case = dict(zip(header, fields, strict=True))
        if case["expect"] not in ("allow", "deny"):
            problems.append(Problem(name, line, f"expect must be allow or deny, got {case['expect']!r}"))
            continue
        if not case["model"] and not case.get("operation"):
            problems.append(Problem(name, line, "name a model, an operation, or both"))
            continue
        results.append(_run(policy, line, case))
    return results, problems


def _run(policy: Policy, line: int, case: dict[str, str]) -> CaseResult:
    tenant, user, model, operation = case["tenant"], case["user"], case["model"], case.get("operation", "")
    roles = tuple(r.strip() for r in case["roles"].split("|") if r.strip())
    subjects = (user, *(f"role:{r}" for r in roles))
    allowed, rule = True, "default deny"
    if operation:
        decision = policy.decide_operation(tenant, subjects, operation)
        allowed = decision.allowed
        rule = f"policy/operations.csv:{decision.rule.line}" if decision.rule and decision.rule.line else rule
    if model and allowed:
        allowed = policy.decide(tenant, subjects, model).allowed
        deciding = policy.deciding_rule(tenant, subjects, model)
        rule = f"policy/access.csv:{deciding.line}" if deciding else "default deny"
    return CaseResult(line, tenant, user, roles, model, case["expect"], "allow" if allowed else "deny", rule, operation)
