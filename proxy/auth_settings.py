"""`[auth]` of `tollway.toml`: the trusted JWT issuers and the token exchange.

    [auth]
    exchange_ttl = "1h"                  # lifetime of a token from POST /auth/token

    [[auth.issuers]]                     # one entry per trusted issuer; the JWT's `iss` picks it
    name = "github"                      # what events (identity_source) and identities.csv call it
    issuer = "https://token.actions.githubusercontent.com"
    audience = "tollway"
    jwks_url = "https://token.actions.githubusercontent.com/.well-known/jwks"

The older single `[auth.jwt]` table is still read, as one entry named "sso" (its defaults: user from
`email`, tenant from `org`, roles from `groups`, audience optional). An entry with neither
`tenant_claim` nor `tenant` maps tokens only through `policy/identities.csv`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from proxy.durations import EXAMPLES, parse_duration

#: Signature algorithms an entry may accept: asymmetric only (no `none`, no HMAC with a public key).
SUPPORTED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
DEFAULT_ALGORITHMS = ("RS256", "ES256")
LEGACY_NAME = "sso"
MAX_EXCHANGE_TTL = timedelta(days=30)  # exchanged tokens are meant to be short-lived
_ENTRY_KEYS = ("name", "issuer", "audience", "jwks_url", "public_key_file", "algorithms", "user_claim",
               "tenant_claim", "tenant", "roles_claim", "roles")


class AuthSettingsError(ValueError):
    """`[auth]` cannot be used; the message names the key and what to write instead."""


@dataclass(frozen=True, slots=True)
class IssuerSettings:
    """One trusted JWT issuer: how its tokens are verified and how their claims become an identity."""

    name: str
    """Short name: `identity_source` of events, the first column of policy/identities.csv."""
    issuer: str
    """The exact `iss` claim of its tokens; it picks this entry."""
    audience: str | None = None
    """The `aud` its tokens must carry (required for [[auth.issuers]]; optional for the old [auth.jwt])."""
    jwks_url: str | None = None
    """Where its signing keys are published (cached; fetched again when a token names an unknown kid)."""
    public_key_file: str | None = None
    """A PEM public key instead of a JWKS (relative paths are under the deployment directory)."""
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    """Signature algorithms accepted from this issuer."""
    user_claim: str = "sub"
    """Claim naming the user (when policy/identities.csv does not name one)."""
    tenant_claim: str | None = None
    """Claim naming the tenant; with neither this nor `tenant`, only policy/identities.csv maps tokens."""
    tenant: str | None = None
    """A fixed tenant for every token of this issuer."""
    roles_claim: str | None = None
    """Claim holding the roles (a list of strings, or one string)."""
    roles: tuple[str, ...] = ()
    """Fixed roles for every token of this issuer."""

    @property
    def maps_tenant(self) -> bool:
        """True when the entry itself names the tenant (a claim or a fixed one)."""
        return bool(self.tenant_claim or self.tenant)


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """`[auth]`: trusted issuers, in file order ([auth.jwt] first), and the exchange lifetime."""

    issuers: tuple[IssuerSettings, ...] = ()
    """Every trusted issuer; empty: only Tollway tokens are accepted."""
    exchange_ttl: timedelta = field(default=timedelta(hours=1))
    """Lifetime of a token issued by POST /auth/token (`exchange_ttl = "1h"`)."""

    def by_issuer(self) -> dict[str, IssuerSettings]:
        return {entry.issuer: entry for entry in self.issuers}


def load_auth(raw: dict[str, Any], path: Path) -> AuthSettings:
    """`[auth]` of `path`, validated: unknown keys, missing fields and clashes are refused by name."""
    where = f"{path} [auth]"
    unknown = set(raw) - {"jwt", "issuers", "exchange_ttl"}
    if unknown:
        raise AuthSettingsError(f"{where}: unknown key(s) {sorted(unknown)}; known: exchange_ttl, jwt, issuers")
    issuers = []
    legacy = _table(raw.get("jwt", {}), f"{path} [auth.jwt]")
    _known_keys(legacy, f"{path} [auth.jwt]")
    if legacy.get("issuer") and (legacy.get("jwks_url") or legacy.get("public_key_file")):
        issuers.append(_entry(legacy, f"{path} [auth.jwt]", legacy=True))
    entries = raw.get("issuers", [])
    if not isinstance(entries, list):
        raise AuthSettingsError(f"{where}: write issuers as [[auth.issuers]] tables, one per issuer")
    for index, entry in enumerate(entries, start=1):
        issuers.append(_entry(_table(entry, f"{path} [[auth.issuers]] #{index}"),
                              f"{path} [[auth.issuers]] #{index}", legacy=False))
    _check_unique(issuers, where)
    return AuthSettings(tuple(issuers), _ttl(raw.get("exchange_ttl", "1h"), where))


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise AuthSettingsError(f"{where}: must be a table")
    return value


def _known_keys(raw: dict[str, Any], where: str) -> None:
    unknown = set(raw) - set(_ENTRY_KEYS)
    if unknown:
        raise AuthSettingsError(f"{where}: unknown key(s) {sorted(unknown)}; known: {', '.join(_ENTRY_KEYS)}")


def _entry(raw: dict[str, Any], where: str, *, legacy: bool) -> IssuerSettings:
    _known_keys(raw, where)
    defaults = {"name": LEGACY_NAME, "user_claim": "email", "tenant_claim": "org", "roles_claim": "groups"}
    values = ({k: v for k, v in defaults.items() if not _conflicts(k, raw)} if legacy else {}) | raw
    for key, value in values.items():
        if key in ("algorithms", "roles"):
            values[key] = _strings(value, f"{where}: {key}")
        elif not isinstance(value, str) or not value:
            raise AuthSettingsError(f"{where}: {key} must be a non-empty string, got {value!r}")
    _require(values, where, legacy)
    return IssuerSettings(**values)


def _conflicts(default_key: str, raw: dict[str, Any]) -> bool:
    """A legacy default that the table overrides with its fixed counterpart (tenant, roles)."""
    return {"tenant_claim": "tenant", "roles_claim": "roles"}.get(default_key) in raw


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AuthSettingsError(f"{where} must be a list of strings, e.g. [\"ci\"]")
    return tuple(value)


def _require(values: dict[str, Any], where: str, legacy: bool) -> None:
    missing = [k for k in ("name", "issuer") if k not in values] + ([] if legacy or "audience" in values
                                                                     else ["audience"])
    if missing:
        raise AuthSettingsError(f"{where}: {', '.join(missing)} required")
    if not values["name"].replace("-", "").replace("_", "").isalnum():
        raise AuthSettingsError(f"{where}: name {values['name']!r} may hold letters, digits, - and _")
    if ("jwks_url" in values) == ("public_key_file" in values):
        raise AuthSettingsError(f"{where}: give exactly one of jwks_url and public_key_file")
    for fixed, claim in (("tenant", "tenant_claim"), ("roles", "roles_claim")):
        if fixed in values and claim in values:
            raise AuthSettingsError(f"{where}: give {claim} or {fixed}, not both")
    bad = [a for a in values.get("algorithms", ()) if a not in SUPPORTED_ALGORITHMS]
    if bad or values.get("algorithms") == ():
        raise AuthSettingsError(f"{where}: algorithms {bad or '[]'} not accepted; use some of "
                                f"{', '.join(SUPPORTED_ALGORITHMS)}")


def _check_unique(issuers: list[IssuerSettings], where: str) -> None:
    for attribute in ("name", "issuer"):
        seen: set[str] = set()
        for entry in issuers:
            value = getattr(entry, attribute)
            if value in seen:
                raise AuthSettingsError(f"{where}: two issuer entries share the {attribute} {value!r}; each "
                                        f"needs its own (the token's iss picks one entry)")
            seen.add(value)


def _ttl(text: Any, where: str) -> timedelta:
    ttl = parse_duration(text) if isinstance(text, str) else None
    if ttl is None or ttl <= timedelta(0):
        raise AuthSettingsError(f"{where}: exchange_ttl {text!r} must be a duration, {EXAMPLES}")
    if ttl > MAX_EXCHANGE_TTL:
        raise AuthSettingsError(f"{where}: exchange_ttl {text!r} is longer than 30d; exchanged tokens are meant to "
                                "be short-lived (use `tollway tokens create` for a long-lived one)")
    return ttl
