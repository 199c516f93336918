"""`tollway policy test FILE`: a CSV truth table of expected decisions, run against the policy.

    tenant,user,roles,model,expect
    acme,alice@acme.com,engineering,anthropic/claude-sonnet-4-5,allow
    acme,dana@acme.com,engineering|contractors,anthropic/claude-opus-4-1,deny

`roles` are the credential's roles, `|`-separated (may be empty); `expect` is allow or deny. With an
`operation` column before `expect` (`tenant,user,roles,model,operation,expect`) a case checks
policy/operations.csv too: it is allowed when the operation is and (if `model` is not empty) the model is.

Identity rules (policy/identities.csv) are tested by two more leading columns, `issuer` (an
[[auth.issuers]] name) and `claims` (`name=value` pairs, `|`-separated; a name given twice is a list
claim such as groups):

    issuer,claims,tenant,user,roles,model,expect
    github,sub=repo:acme/payments-api:ref:refs/heads/main,acme,ci:payments,ci,openai/gpt-4o-mini,allow
    github,sub=repo:acme/web:ref:refs/heads/main,,,,,unmapped

The token is mapped as the gateway maps it; `tenant`, `user` and `roles` are then what it must map to
(a case fails when it maps elsewhere), and `expect` the decision. `expect` = `unmapped` means no line
may map it (the gateway answers 403 identity_not_mapped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from policy.engine import Policy
from policy.files import Problem, csv_lines

HEADER = ["tenant", "user", "roles", "model", "expect"]
HEADER_WITH_OPERATION = ["tenant", "user", "roles", "model", "operation", "expect"]
IDENTITY_COLUMNS = ["issuer", "claims"]
HEADERS = (HEADER, HEADER_WITH_OPERATION, IDENTITY_COLUMNS + HEADER, IDENTITY_COLUMNS + HEADER_WITH_OPERATION)
#: (issuer name, claims) -> (tenant, user, roles, the deciding identities.csv line) or None when nothing maps
#: them; raises KeyError for an issuer tollway.toml does not trust, ValueError for claims the gateway refuses.
Mapper = Callable[[str, dict], tuple[str, str, tuple[str, ...], str] | None]


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
    issuer: str = ""  # an identity case: the issuer entry and where the mapping came from
    identity_rule: str = ""

    @property
    def passed(self) -> bool:
        return self.expected == self.actual


def run_cases(policy: Policy, path: Path, mapper: Mapper | None = None) -> tuple[list[CaseResult], list[Problem]]:
    rows = csv_lines(path)
    name = path.name
    header = rows[0][1] if rows else None
    if header not in HEADERS:
        line = rows[0][0] if rows else 0
        return [], [Problem(name, line, f"header must be {','.join(HEADER)} or {','.join(HEADER_WITH_OPERATION)}"),
                    Problem(name, line, f"identity cases start with {','.join(IDENTITY_COLUMNS)}, e.g. "
                                        f"{','.join(IDENTITY_COLUMNS + HEADER)}", "warning")]
    results, problems = [], []
    for line, fields in rows[1:]:
        if len(fields) != len(header):
            problems.append(Problem(name, line, f"expected {len(header)} columns, got {len(fields)}"))
            continue
        case = dict(zip(header, fields, strict=True))
        problem = _case_problem(case)
        if problem:
            problems.append(Problem(name, line, problem))
            continue
        if "issuer" in case:
            result = _run_identity(policy, line, case, mapper)
            if isinstance(result, str):
                problems.append(Problem(name, line, result))
                continue
            results.append(result)
        else:
            results.append(_run(policy, line, case))
    return results, problems


def _case_problem(case: dict[str, str]) -> str | None:
    expects = ("allow", "deny", "unmapped") if "issuer" in case else ("allow", "deny")
    if case["expect"] not in expects:
        return f"expect must be {', '.join(expects[:-1])} or {expects[-1]}, got {case['expect']!r}"
    if case["expect"] != "unmapped" and not case["model"] and not case.get("operation"):
        return "name a model, an operation, or both"
    return None


def _run_identity(policy: Policy, line: int, case: dict[str, str], mapper: Mapper | None) -> CaseResult | str:
    """Map the case's claims as the gateway would, compare with the expected identity, then decide."""
    claims = parse_claims(case["claims"])
    if isinstance(claims, str):
        return claims
    try:
        mapped = mapper(case["issuer"], claims) if mapper else None
    except KeyError:
        return f"issuer {case['issuer']!r} is not an [[auth.issuers]] entry of tollway.toml"
    except ValueError as exc:  # the claims lack what the mapping needs (the gateway answers 401)
        return str(exc)
    roles = _roles(case["roles"])
    base = dict(line=line, tenant=case["tenant"], user=case["user"], roles=roles, model=case["model"],
                expected=case["expect"], operation=case.get("operation", ""), issuer=case["issuer"])
    if mapped is None:
        return CaseResult(**base, actual="unmapped", rule="no identity rule matched")
    tenant, user, mapped_roles, where = mapped
    if case["expect"] == "unmapped" or (tenant, user, sorted(mapped_roles)) != (case["tenant"], case["user"],
                                                                                sorted(roles)):
        shown = f"mapped to {tenant} {user} [{'|'.join(mapped_roles)}]"
        return CaseResult(**base, actual=shown, rule=where, identity_rule=where)
    decided = _run(policy, line, case)
    return CaseResult(**{**base, "actual": decided.actual, "rule": decided.rule, "identity_rule": where})


def parse_claims(text: str) -> dict | str:
    """`sub=repo:acme/x|groups=a|groups=b` -> {"sub": "repo:acme/x", "groups": ["a", "b"]}; or the problem."""
    claims: dict = {}
    for pair in (p for p in text.split("|") if p.strip()):
        name, equals, value = pair.partition("=")
        if not equals or not name.strip():
            return f"claims must be name=value pairs separated by |, got {pair!r}"
        name = name.strip()
        if name in claims:
            claims[name] = [*(claims[name] if isinstance(claims[name], list) else [claims[name]]), value.strip()]
        else:
            claims[name] = value.strip()
    return claims


def _roles(text: str) -> tuple[str, ...]:
    return tuple(r.strip() for r in text.split("|") if r.strip())


def _run(policy: Policy, line: int, case: dict[str, str]) -> CaseResult:
    tenant, user, model, operation = case["tenant"], case["user"], case["model"], case.get("operation", "")
    roles = _roles(case["roles"])
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
