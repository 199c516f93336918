"""`tollway policy explain`: why a request would be allowed or denied, which key pays, what limits apply."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from policy.engine import EXPLICIT_OPERATIONS
from policy.files import LimitRule, RouteRule
from policy.loader import PolicySet
from proxy.control import ProviderKey
from proxy.metering import Priced
from proxy.pricebook import book_provider


@dataclass(frozen=True)
class KeyChoice:
    key_id: str
    status: str  # active | revoked | missing | other tenant's | other provider's
    billing_mode: str | None


@dataclass(frozen=True)
class Explanation:
    tenant: str
    user: str
    roles: list[str]
    model: str
    allowed: bool
    deciding_line: int | None
    matching: list[dict]
    route: RouteRule | None
    keys: list[KeyChoice]
    limits: list[LimitRule]
    price: Priced | None = None  # the price in force now; None: unpriced

    @property
    def unpriced_refused(self) -> bool:
        """An unpriced model under a usd limit is refused (with the default `[metering] unpriced`)."""
        return self.price is None and any(lim.metric == "usd" for lim in self.limits)

    @property
    def key_used(self) -> KeyChoice | None:
        return next((k for k in self.keys if k.status == "active"), None)

    def as_json(self) -> dict:
        used = self.key_used
        return {
            "tenant": self.tenant, "user": self.user, "roles": self.roles, "model": self.model,
            "decision": "allow" if self.allowed else "deny",
            "deciding_rule": f"policy/access.csv:{self.deciding_line}" if self.deciding_line else "default deny",
            "matching_rules": self.matching,
            "route": None if self.route is None else {
                "line": f"policy/routes.csv:{self.route.line}", "keys": [k.__dict__ for k in self.keys]},
            "key": used.key_id if used else None, "billing_mode": used.billing_mode if used else None,
            "limits": [{"line": f"policy/limits.csv:{lim.line}", "tenant": lim.tenant, "subject": lim.subject,
                        "metric": lim.metric, "window": lim.window, "limit": str(lim.limit)} for lim in self.limits],
            "price": None if self.price is None else {
                "priced_model": self.price.model, "source": self.price.source,
                "input_usd_per_mtok": str(self.price.price.input), "output_usd_per_mtok": str(self.price.price.output)},
        }


def explain(policies: PolicySet, keys: Mapping[str, ProviderKey] | None, tenant: str, user: str,
            roles: list[str], model: str) -> Explanation:
    subjects = (user, *(f"role:{r}" for r in roles))
    policy = policies.policy
    decision = policy.decide(tenant, subjects, model)
    decided = policy.deciding_rule(tenant, subjects, model)
    matching = [{"line": f"policy/access.csv:{r.line}", "subject": r.subject, "tenant": r.tenant,
                 "model": r.model_glob, "effect": r.effect, "decided": r is decided}
                for r in policy.matching_rules(tenant, subjects, model)]
    provider = model.split("/", 1)[0]
    choices = [_key_choice(k, keys, tenant, provider) for k in decision.route.key_ids] if decision.route else []
    limits = [rule for rule, _ in policy.limits_for(tenant, user, subjects)]
    name = model.split("/", 1)[1] if "/" in model else model
    price = policies.prices.price(provider, name, book_provider(provider, provider), datetime.now(UTC))
    return Explanation(tenant, user, roles, model, decision.allowed,
                       decided.line if decided else None, matching, decision.route, choices, limits, price)


@dataclass(frozen=True)
class OperationExplanation:
    operation: str
    allowed: bool
    deciding: str  # where the deciding rule is, or why none decided
    matching: list[dict]

    def as_json(self) -> dict:
        return {"operation": self.operation, "decision": "allow" if self.allowed else "deny",
                "deciding_rule": self.deciding, "matching_rules": self.matching}

    def render(self) -> list[str]:
        lines = [f"  operation {self.operation}: {'ALLOW' if self.allowed else 'DENY'}",
                 f"    decided by: {self.deciding}"]
        for rule in self.matching:
            mark = "  ← decides" if rule["decided"] else ""
            lines.append(f"      {rule['line']}: p, {rule['subject']}, {rule['tenant']}, {rule['operation']}, "
                         f"{rule['effect']}{mark}")
        return lines


def explain_operation(policies: PolicySet, tenant: str, user: str, roles: list[str],
                      operation: str) -> OperationExplanation:
    """Why `provider/operation` would be allowed or denied (policy/operations.csv)."""
    subjects = (user, *(f"role:{r}" for r in roles))
    policy = policies.policy
    decision = policy.decide_operation(tenant, subjects, operation)
    matching = [{"line": _operation_line(r.line), "subject": r.subject, "tenant": r.tenant,
                 "operation": r.operation_glob, "effect": r.effect, "decided": r is decision.rule}
                for r in policy.matching_operation_rules(tenant, subjects, operation)]
    if decision.rule is not None:
        deciding = _operation_line(decision.rule.line)
    elif operation.partition("/")[2] in EXPLICIT_OPERATIONS:
        deciding = f"no rule names {operation.partition('/')[2]!r} (default deny: `*` never allows it)"
    else:
        deciding = "no rule matched (default deny)"
    return OperationExplanation(operation, decision.allowed, deciding, matching)


def _operation_line(line: int) -> str:
    return f"policy/operations.csv:{line}" if line else "the default operations policy (no policy/operations.csv)"


def _key_choice(key_id: str, keys: Mapping[str, ProviderKey] | None, tenant: str, provider: str) -> KeyChoice:
    key = (keys or {}).get(key_id)
    if key is None:
        return KeyChoice(key_id, "missing", None)
    if key.owner_tenant not in (None, tenant):
        return KeyChoice(key_id, "other tenant's", None)
    if key.provider != provider:
        return KeyChoice(key_id, "other provider's", None)
    return KeyChoice(key_id, key.status, "byok" if key.owner_tenant else "unified")


def render(x: Explanation) -> str:
    lines = [f"{x.user} ({', '.join('role:' + r for r in x.roles) or 'no token roles'}) in tenant {x.tenant} "
             f"→ {x.model}: {'ALLOW' if x.allowed else 'DENY'}",
             f"  decided by: {'policy/access.csv:' + str(x.deciding_line) if x.deciding_line else 'no rule matched (default deny)'}"]
    lines.append("  matching rules:" if x.matching else "  matching rules: none")
    for rule in x.matching:
        mark = "  ← decides" if rule["decided"] else ""
        lines.append(f"    {rule['line']}: p, {rule['subject']}, {rule['tenant']}, {rule['model']}, {rule['effect']}{mark}")
    if x.route is None:
        lines.append("  key route: none (requests would get 403 no key route)")
    else:
        lines.append(f"  key route: policy/routes.csv:{x.route.line}")
        for key in x.keys:
            lines.append(f"    {key.key_id}: {key.status}" + (f" ({key.billing_mode})" if key.billing_mode else ""))
        used = x.key_used
        lines.append(f"  would use: {used.key_id}, billing {used.billing_mode}" if used else "  would use: no usable key")
    lines.append("  limits:" if x.limits else "  limits: none")
    for lim in x.limits:
        lines.append(f"    policy/limits.csv:{lim.line}: {lim.tenant}, {lim.subject}: {lim.limit} {lim.metric} per {lim.window}")
    if x.price is not None:
        lines.append(f"  price: {x.price.model} ({x.price.source}): ${x.price.price.input} in / "
                     f"${x.price.price.output} out per million tokens")
    else:
        lines.append("  price: none (" + ("refused under the usd limit above: price it in pricing.csv" if
                                          x.unpriced_refused else "served and recorded with no cost") + ")")
    return "\n".join(lines)


@dataclass(frozen=True)
class IdentityExplanation:
    """Which issuer entry a JWT names and how it maps (policy/identities.csv line, or the entry itself)."""

    issuer: str  # the entry's name
    issuer_url: str
    tenant: str | None  # None: no identity (see refusal)
    user: str | None
    roles: list[str]
    decided_by: str  # "policy/identities.csv:N" | "the issuer entry" | "no identity rule matched"
    rule: str | None  # the matching line's fields
    refusal: str | None  # why the gateway would refuse the token (403/401 message), else None

    def as_json(self) -> dict:
        return {"issuer": self.issuer, "iss": self.issuer_url, "tenant": self.tenant, "user": self.user,
                "roles": self.roles, "decided_by": self.decided_by, "rule": self.rule, "refusal": self.refusal,
                "verified": False}

    def render(self) -> list[str]:
        lines = [f"JWT of issuer {self.issuer!r} ({self.issuer_url}); its signature, audience and expiry are not "
                 "checked here"]
        if self.refusal:
            return lines + [f"  identity: none: {self.refusal}"]
        lines.append(f"  identity: {self.decided_by}" + (f": {self.rule}" if self.rule else ""))
        lines.append(f"    → tenant {self.tenant}, user {self.user}, roles {', '.join(self.roles) or 'none'}")
        return lines


def explain_identity(policies: PolicySet, issuers, token: str) -> IdentityExplanation:
    """How the gateway would map this JWT (unverified: explain runs offline). Raises ValueError when the
    token is unreadable or its issuer is not trusted, with the gateway's own wording."""
    from proxy.errors import TollwayError
    from proxy.identity_map import map_identity
    from proxy.jwt_auth import unverified_claims

    try:
        claims = unverified_claims(token)
    except TollwayError as exc:
        raise ValueError(exc.message) from exc
    entry = next((e for e in issuers if e.issuer == claims.get("iss")), None)
    if entry is None:
        trusted = ", ".join(f"{e.name} ({e.issuer})" for e in issuers) or "none"
        raise ValueError(f"the JWT's issuer {claims.get('iss')!r} is not trusted by tollway.toml (trusted: {trusted})")
    try:
        identity, rule = map_identity(entry, claims, policies.files.identities)
    except TollwayError as exc:
        return IdentityExplanation(entry.name, entry.issuer, None, None, [], "no identity", None,
                                   f"{exc.status} {exc.message}")
    where = f"policy/identities.csv:{rule.line}" if rule else "the issuer entry (no line of policy/identities.csv matched)"
    return IdentityExplanation(entry.name, entry.issuer, identity.tenant, identity.user, list(identity.roles), where,
                               rule.as_row() if rule else None, None)
