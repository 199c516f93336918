"""A verified JWT's claims become an `Identity`: through policy/identities.csv, else the issuer's entry.

    1. the first line of policy/identities.csv naming this issuer whose claim matches: its tenant, user
       (or, left empty, the entry's user_claim) and roles;
    2. else, when the entry names the tenant (`tenant_claim` or a fixed `tenant`): the entry's mapping;
    3. else 403 `identity_not_mapped`: an issuer without a tenant mapping needs a matching line.

The same function serves the gateway, `policy explain --jwt` and `policy test`, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

from policy.identities import IdentityRule, claim_values, first_match
from proxy.auth import Identity
from proxy.auth_settings import IssuerSettings
from proxy.errors import Forbidden, Unauthenticated

_MAX_IDENTIFIER = 256  # characters of a user, tenant or group name taken from a claim
_MAX_ROLES = 256
_SHOWN_CHARS = 120  # of a claim value quoted back in a refusal


class IdentityNotMapped(Forbidden):
    """A trusted token that no line of policy/identities.csv maps, from an issuer that names no tenant."""

    code = "identity_not_mapped"


def map_identity(entry: IssuerSettings, claims: dict, rules: Sequence[IdentityRule],
                 auth_method: str = "jwt") -> tuple[Identity, IdentityRule | None]:
    """The identity these verified claims act as, and the identities.csv line that decided it (None: the entry)."""
    rule = first_match(rules, entry.name, claims)
    if rule is not None:
        user = rule.user or identifier(claims, entry.user_claim, "to identify the user")
        return Identity(rule.tenant, user, rule.roles, auth_method, identity_source=entry.name), rule
    if not entry.maps_tenant:
        raise IdentityNotMapped(not_mapped_message(entry, claims, rules))
    user = identifier(claims, entry.user_claim, "to identify the user")
    tenant = entry.tenant or identifier(claims, entry.tenant_claim, "naming the tenant")
    roles = entry.roles or claim_roles(claims, entry.roles_claim)
    return Identity(tenant, user, roles, auth_method, identity_source=entry.name), None


def not_mapped_message(entry: IssuerSettings, claims: dict, rules: Sequence[IdentityRule]) -> str:
    """Names the issuer, says no rule matched, and quotes the claims the issuer's rules look at."""
    names = list(dict.fromkeys([r.claim for r in rules if r.issuer == entry.name] or [entry.user_claim, "sub"]))
    shown = ", ".join(f"{name}={_shown(claims.get(name))}" for name in names[:3])
    return (f"No identity rule matched this token from issuer {entry.name!r}: no line of policy/identities.csv "
            f"for {entry.name!r} matches it ({shown}). Ask your governance lead to add one for this identity.")


def _shown(value: object) -> str:
    values = claim_values(value)
    if not values:
        return "missing"
    text = "|".join(values)
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…")


def claim_roles(claims: dict, name: str | None) -> tuple[str, ...]:
    """Roles from a list-of-strings (or single string) claim; none when the entry names no roles claim."""
    if not name:
        return ()
    groups = claims.get(name) or []
    groups = [groups] if isinstance(groups, str) else groups
    if not isinstance(groups, list) or len(groups) > _MAX_ROLES:
        raise Unauthenticated(f"JWT claim {name!r} must be a list of at most {_MAX_ROLES} group names.")
    roles = tuple(g for g in groups if isinstance(g, str) and g)
    if any(not usable(r) for r in roles):
        raise Unauthenticated(f"JWT claim {name!r} holds a group name that is not a usable identifier "
                              f"(at most {_MAX_IDENTIFIER} printable characters).")
    return roles


def identifier(claims: dict, name: str | None, what: str) -> str:
    """A user, tenant or group name from a claim: a non-empty string of at most `_MAX_IDENTIFIER`
    printable characters (it becomes a policy subject, a log field, a metric label's candidate)."""
    value = claims.get(name) if name else None
    if not isinstance(value, str) or not value:
        raise Unauthenticated(f"JWT has no {name!r} claim {what}.")
    if not usable(value):
        raise Unauthenticated(f"JWT claim {name!r} is not a usable identifier (at most {_MAX_IDENTIFIER} printable "
                              "characters).")
    return value


def usable(value: str) -> bool:
    return len(value) <= _MAX_IDENTIFIER and value.isprintable()
