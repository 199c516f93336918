"""Casbin enforcers for access and key routing, and `decide()` for one request.

Access is one Casbin enforcer per tenant (that tenant's rules plus the `*` ones), so a decision
scans only the rules that can apply. Decisions are data and are cached per
(tenant, subjects, model) for the lifetime of one `Policy`: a reload builds a new `Policy`,
so a cache can never outlive the rules it was computed from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import casbin
from casbin import model as casbin_model

from policy.files import (
    BUILT_IN_MODEL_CONF,
    AccessRule,
    LimitRule,
    OperationRule,
    PolicyFiles,
    RouteRule,
    glob_regex,
)

# Casbin logs every denied request with its subject (a user id) at WARNING: keep user ids out of logs.
logging.getLogger("casbin").setLevel(logging.ERROR)

ANY_TENANT = "*"
_CACHE_LIMIT = 100_000

ROUTE_MODEL = """
[request_definition]
r = dom, obj
[policy_definition]
p = dom, obj, keys
[policy_effect]
e = some(where (p.eft == allow))
[matchers]
m = (p.dom == "*" || p.dom == r.dom) && modelGlob(r.obj, p.obj)
"""


#: operations.csv: the access model, with one difference in the matcher: see `operation_glob`.
OPERATION_MODEL = """
[request_definition]
r = sub, dom, obj
[policy_definition]
p = sub, dom, obj, eft
[role_definition]
g = _, _, _
[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))
[matchers]
m = subjectMatch(r.sub, p.sub, r.dom) && (p.dom == "*" || p.dom == r.dom) && operationGlob(r.obj, p.obj, p.eft)
"""
#: Operations a rule allows only by naming them: `*` or `openai/*` never opens the admin API, nor
#: objects no tenant created through Tollway (`objects.unowned`, see `proxy.objects`).
EXPLICIT_OPERATIONS = ("admin", "other", "objects.unowned")


def operation_glob(operation: str, glob: str, effect: str = "allow") -> bool:
    """Does an operations.csv glob cover `provider/operation`? An allow covers `admin` and `other` only
    when its operation part names them (`*/admin`, `openai/other`); a deny covers them like anything else.

    >>> operation_glob("openai/files.create", "*/files.*"), operation_glob("openai/admin", "*")
    (True, False)
    >>> operation_glob("openai/admin", "*/admin"), operation_glob("openai/admin", "*", "deny")
    (True, True)
    """
    if glob_regex(glob).match(operation) is None:
        return False
    name = operation.partition("/")[2]
    return effect != "allow" or name not in EXPLICIT_OPERATIONS or glob.partition("/")[2] == name


def model_glob(name: str, glob: str) -> bool:
    """`*` matches any run of characters (`/` included), `?` exactly one.

    >>> model_glob("openai/gpt-4o-mini", "openai/*"), model_glob("openai/gpt-4o", "*mini")
    (True, False)
    """
    return glob_regex(glob).match(name) is not None


@dataclass(frozen=True, slots=True)
class OperationDecision:
    allowed: bool
    rule: OperationRule | None  # the rule to show as the reason (None: default deny)


@dataclass(frozen=True, slots=True)
class AccessDecision:
    allowed: bool
    rule: AccessRule | None  # the rule that decided (None: no rule matched, default deny)
    route: RouteRule | None  # the first route matching tenant and model


def subject_matches(roles, subjects: tuple[str, ...], rule_subject: str, domain: str) -> bool:
    """A rule's subject applies when it is `*`, one of the subjects, or a role they hold via g lines
    (in this tenant, or in every tenant through a `g, user, role:NAME, *` line)."""
    if rule_subject == "*":
        return True
    return any(s == rule_subject or roles.has_link(s, rule_subject, domain) or roles.has_link(s, rule_subject, ANY_TENANT)
               for s in subjects)


class Policy:
    """An immutable, validated policy set. Build a new one to change anything."""

    def __init__(self, files: PolicyFiles, model_conf: Path | None = None) -> None:
        if files.errors:
            raise ValueError("refusing to build a policy from files with errors")
        self.files = files
        conf = model_conf if model_conf and model_conf.exists() else BUILT_IN_MODEL_CONF
        self._model_text = conf.read_text(encoding="utf-8")
        tenants = {r.tenant for r in files.access} | {g.tenant for g in files.roles} | set(files.tenants)
        self._access = {t: self._access_enforcer(t) for t in tenants | {ANY_TENANT}}
        self._operations = {t: self._operation_enforcer(t) for t in tenants | {ANY_TENANT}}
        self._operation_cache: dict[tuple[str, tuple[str, ...], str], OperationDecision] = {}
        self._routes = self._route_enforcer()
        self._rules: dict[tuple[str, ...], AccessRule] = {}
        for rule in files.access:  # a duplicate line is reported by the first one
            self._rules.setdefault(tuple(rule.as_row()), rule)
        self._route_rules: dict[tuple[str, ...], RouteRule] = {}
        for route in files.routes:
            self._route_rules.setdefault((route.tenant, route.model_glob, "|".join(route.key_ids)), route)
        self._cache: dict[tuple[str, tuple[str, ...], str], AccessDecision] = {}
        self._limit_cache: dict[tuple[str, tuple[str, ...]], list[tuple[LimitRule, bool]]] = {}

    def decide(self, tenant: str, subjects: tuple[str, ...], model: str) -> AccessDecision:
        """May these subjects use `provider/model` in this tenant, and which route serves it?

        `subjects` is the user id followed by `role:NAME` for each role the credential carries.
        """
        key = (tenant, subjects, model)
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            cached = self._cache[key] = self._decide(tenant, subjects, model)
        return cached

    def _decide(self, tenant: str, subjects: tuple[str, ...], model: str) -> AccessDecision:
        enforcer = self._access.get(tenant) or self._access[ANY_TENANT]
        allowed, row = enforcer.enforce_ex(subjects, tenant, model)
        rule = self._rules.get(tuple(row)) if row else None
        route_ok, route_row = self._routes.enforce_ex(tenant, model)
        route = self._route_rules.get(tuple(route_row)) if route_ok and route_row else None
        return AccessDecision(bool(allowed), rule, route)

    def decide_operation(self, tenant: str, subjects: tuple[str, ...], operation: str) -> OperationDecision:
        """May these subjects call `provider/operation` (e.g. `openai/files.create`) in this tenant?"""
        key = (tenant, subjects, operation)
        cached = self._operation_cache.get(key)
        if cached is None:
            if len(self._operation_cache) >= _CACHE_LIMIT:
                self._operation_cache.clear()
            enforcer = self._operations.get(tenant) or self._operations[ANY_TENANT]
            allowed = bool(enforcer.enforce(subjects, tenant, operation))
            effect = "allow" if allowed else "deny"
            rule = next((r for r in self.matching_operation_rules(tenant, subjects, operation) if r.effect == effect),
                        None)
            cached = self._operation_cache[key] = OperationDecision(allowed, rule)
        return cached

    def matching_operation_rules(self, tenant: str, subjects: tuple[str, ...], operation: str) -> list[OperationRule]:
        """Every operations rule that applies to this call, in file order (for `policy explain`)."""
        roles = (self._access.get(tenant) or self._access[ANY_TENANT]).get_role_manager()
        return [r for r in self.files.operations
                if r.tenant in (tenant, ANY_TENANT) and operation_glob(operation, r.operation_glob, r.effect)
                and subject_matches(roles, subjects, r.subject, tenant)]

    def limits_for(self, tenant: str, user: str, subjects: tuple[str, ...]) -> list[tuple[LimitRule, bool]]:
        """The limits.csv rules that apply, each with whether it counts per user (else the whole tenant)."""
        key = (tenant, subjects)
        found = self._limit_cache.get(key)
        if found is None:
            held = self.roles_of(tenant, subjects)
            found = [(rule, rule.subject != "tenant") for rule in self.files.limits
                     if rule.tenant in (tenant, ANY_TENANT)
                     and (rule.subject in ("tenant", "*", user) or rule.subject in held)]
            if len(self._limit_cache) >= _CACHE_LIMIT:
                self._limit_cache.clear()
            self._limit_cache[key] = found
        return found

    def matching_rules(self, tenant: str, subjects: tuple[str, ...], model: str) -> list[AccessRule]:
        """Every access rule that applies to this request, in file order (for `policy explain`)."""
        roles = (self._access.get(tenant) or self._access[ANY_TENANT]).get_role_manager()
        return [r for r in self.files.access
                if r.tenant in (tenant, ANY_TENANT) and model_glob(model, r.model_glob)
                and subject_matches(roles, subjects, r.subject, tenant)]

    def deciding_rule(self, tenant: str, subjects: tuple[str, ...], model: str) -> AccessRule | None:
        """The rule to show as the reason: the first matching deny when denied by one, else the first
        matching allow (Casbin reports whichever it met last; people read files top down)."""
        decision = self.decide(tenant, subjects, model)
        effect = "allow" if decision.allowed else "deny"
        return next((r for r in self.matching_rules(tenant, subjects, model) if r.effect == effect), None)

    def roles_of(self, tenant: str, subjects: tuple[str, ...]) -> set[str]:
        """`role:NAME`s the subjects hold in the tenant: carried by the credential or granted by g lines."""
        roles = (self._access.get(tenant) or self._access[ANY_TENANT]).get_role_manager()
        held = {s for s in subjects if s.startswith("role:")}
        pending = list(subjects)
        while pending:  # follow g links (in this tenant and in every tenant), roles of roles included
            name = pending.pop()
            for domain in (tenant, ANY_TENANT):
                for role in roles.get_roles(name, domain):
                    if role not in held:
                        held.add(role)
                        pending.append(role)
        return held

    def _access_enforcer(self, tenant: str) -> casbin.Enforcer:
        return self._enforcer(self._model_text, self.files.access, tenant)

    def _operation_enforcer(self, tenant: str) -> casbin.Enforcer:
        return self._enforcer(OPERATION_MODEL, self.files.operations, tenant)

    def _enforcer(self, model_text: str, rows: list[AccessRule] | list[OperationRule], tenant: str) -> casbin.Enforcer:
        """Rules of `tenant` and `*`, with the access file's role links."""
        enforcer = casbin.Enforcer(self._load_model(model_text))
        rules = _unique([r.as_row() for r in rows if r.tenant in (tenant, ANY_TENANT)])
        links = _unique([[g.user, g.role, g.tenant] for g in self.files.roles if g.tenant in (tenant, ANY_TENANT)])
        if rules:
            enforcer.add_policies(rules)
        if links:
            enforcer.add_grouping_policies(links)
        roles = enforcer.get_role_manager()
        enforcer.add_function("subjectMatch", lambda subjects, rule_subject, domain: subject_matches(
            roles, subjects, rule_subject, domain))
        enforcer.add_function("modelGlob", model_glob)
        enforcer.add_function("operationGlob", operation_glob)
        return enforcer

    def _route_enforcer(self) -> casbin.Enforcer:
        enforcer = casbin.Enforcer(self._load_model(ROUTE_MODEL))
        rows = _unique([[r.tenant, r.model_glob, "|".join(r.key_ids)] for r in self.files.routes])
        if rows:
            enforcer.add_policies(rows)
        enforcer.add_function("modelGlob", model_glob)
        return enforcer

    @staticmethod
    def _load_model(text: str) -> casbin_model.Model:
        model = casbin_model.Model()
        model.load_model_from_text(text)
        return model


def _unique(rows: list[list[str]]) -> list[list[str]]:
    """Casbin refuses a batch holding a duplicate: keep the first of each, in file order."""
    return [list(row) for row in dict.fromkeys(tuple(r) for r in rows)]
