"""SSO, CI and workload identity: a signed JWT from a trusted issuer becomes an `Identity`.

Each `[[auth.issuers]]` entry (and the older `[auth.jwt]`) is one trusted issuer; the token's `iss`
claim picks it, and a token from any other issuer is refused. Only the entry's asymmetric algorithms
are accepted (so `alg: none` and HMAC confusion are refused before any key is looked at). Keys come
from the entry's JWKS URL, cached and refreshed when a token names an unknown `kid` (at most once per
`_REFRESH_S`, one fetch at a time per issuer), or from a static PEM public key. Issuer, audience,
expiry and not-before are always checked. A verified token is remembered until it expires, so the
signature check runs once per token, not once per request; its identity is mapped again whenever
policy/identities.csv was reloaded (see `proxy.identity_map`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from policy.identities import IdentityRule
from proxy.auth import Identity
from proxy.auth_settings import IssuerSettings
from proxy.errors import Unauthenticated
from proxy.identity_map import map_identity

_REFRESH_S = 5.0
_CACHE_LIMIT = 50_000
_LEEWAY_S = 30
_SHOWN_CHARS = 120


def looks_like_jwt(credential: str) -> bool:
    return credential.startswith("eyJ") and credential.count(".") == 2


class IssuerKeys:
    """One issuer's signing keys: a static PEM key, or its JWKS with a single-flight, rate-limited refresh."""

    def __init__(self, entry: IssuerSettings, data_dir: Path) -> None:
        self._entry = entry
        self._static_key: bytes | None = None
        if entry.public_key_file:
            path = Path(entry.public_key_file)
            self._static_key = (path if path.is_absolute() else data_dir / path).read_bytes()  # PEM
        self._jwks: dict[str, Any] = {}
        self._fetched_at = -_REFRESH_S  # monotonic time may start near 0: the first fetch is never held back
        self._refreshing = asyncio.Lock()  # one JWKS fetch at a time; waiters then see its keys

    async def key(self, kid: str | None) -> Any:
        if self._static_key is not None:
            return self._static_key
        if kid not in self._jwks:
            async with self._refreshing:
                if kid not in self._jwks and time.monotonic() - self._fetched_at > _REFRESH_S:
                    await self._refresh()
        if kid is None and len(self._jwks) == 1:
            return next(iter(self._jwks.values()))
        if kid not in self._jwks:
            raise Unauthenticated(f"JWT is signed with an unknown key id {kid!r}.")
        return self._jwks[kid]

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.get(self._entry.jwks_url)
                response.raise_for_status()
                keys = response.json().get("keys", [])
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise Unauthenticated(f"JWT keys (JWKS) of issuer {self._entry.name!r} could not be fetched; "
                                  "try again shortly.") from exc
        loaded = {}
        for jwk in keys if isinstance(keys, list) else []:
            kind = {"RSA": RSAAlgorithm, "EC": ECAlgorithm}.get(jwk.get("kty")) if isinstance(jwk, dict) else None
            if kind and jwk.get("kid"):
                try:
                    loaded[jwk["kid"]] = kind.from_jwk(json.dumps(jwk))
                except (jwt.PyJWTError, ValueError, TypeError):
                    continue  # one unusable key must not hide the others
        self._jwks = loaded


class JwtVerifier:
    """Every trusted issuer of a deployment; `identify(token, rules)` verifies and maps a JWT."""

    def __init__(self, issuers: Sequence[IssuerSettings], data_dir: Path) -> None:
        self._entries = {entry.issuer: entry for entry in issuers}
        self._keys = {entry.issuer: IssuerKeys(entry, data_dir) for entry in issuers}
        # token -> (entry, claims, exp, [rules, identity]): the last mapping, reused while the rules are unchanged
        self._verified: dict[str, tuple[IssuerSettings, dict, float, list]] = {}

    async def identify(self, token: str, rules: Sequence[IdentityRule]) -> Identity:
        """The identity of a valid token; 401 when it is not one, 403 when no identity rule maps it."""
        cached = self._verified.get(token)
        if cached is None or cached[2] <= time.time():
            entry, claims = await self.verify(token)
            cached = (entry, claims, float(claims["exp"]), [None, None])
            if len(self._verified) >= _CACHE_LIMIT:
                self._verified.clear()
            self._verified[token] = cached
        entry, claims, _, memo = cached
        if memo[0] is not rules:
            memo[1] = map_identity(entry, claims, rules)[0]
            memo[0] = rules
        return memo[1]

    async def verify(self, token: str) -> tuple[IssuerSettings, dict]:
        """The trusted entry and the verified claims of `token`, or 401 with the reason."""
        header = _header(token)
        entry = self.entry_for(token)
        alg = header.get("alg")
        if alg not in entry.algorithms:
            raise Unauthenticated(f"JWT algorithm {alg!r} is not accepted; tokens must be signed with "
                                  f"{_either(entry.algorithms)}.")
        key = await self._keys[entry.issuer].key(header.get("kid"))
        return entry, _decode(entry, token, key, alg)

    def entry_for(self, token: str) -> IssuerSettings:
        """The entry the token's (unverified) `iss` names; 401 when no entry trusts that issuer."""
        issuer = unverified_claims(token).get("iss")
        if issuer is None:
            raise Unauthenticated("JWT lacks the required claim 'iss'.")
        entry = self._entries.get(issuer) if isinstance(issuer, str) else None
        if entry is None:
            shown = repr(issuer)[:_SHOWN_CHARS]
            trusted = ", ".join(repr(e) for e in self._entries)
            raise Unauthenticated(f"JWT issuer {shown} is not trusted by this gateway; it accepts tokens from "
                                  f"{trusted}. Ask your Tollway operator to add the issuer to [[auth.issuers]].")
        return entry


def _decode(entry: IssuerSettings, token: str, key: Any, alg: str) -> dict:
    try:
        claims = jwt.decode(token, key, algorithms=[alg], issuer=entry.issuer, audience=entry.audience,
                            leeway=_LEEWAY_S, options={"require": ["exp", "iss"],
                                                       "verify_aud": entry.audience is not None})
    except jwt.PyJWTError as exc:
        raise Unauthenticated(_reason(entry, exc)) from exc
    except (TypeError, ValueError, AttributeError) as exc:  # e.g. RS256 on an EC key: the crypto library's errors
        raise Unauthenticated(f"JWT algorithm {alg!r} does not match the key its kid names.") from exc
    for name in ("exp", "nbf", "iat"):  # PyJWT accepts numeric strings here; RFC 7519 says NumericDate
        if name in claims and (not isinstance(claims[name], int | float) or isinstance(claims[name], bool)):
            raise Unauthenticated(f"JWT claim {name!r} must be a number (seconds since the epoch).")
    return claims


def _reason(entry: IssuerSettings, exc: jwt.PyJWTError) -> str:
    """A 401 message that says what was wrong with the token (never what the key is)."""
    reasons = (
        (jwt.ExpiredSignatureError, "JWT has expired: sign in again to get a fresh one."),
        (jwt.ImmatureSignatureError, "JWT is not valid yet (its nbf or iat is in the future)."),
        (jwt.InvalidAudienceError, f"JWT audience does not match; this gateway accepts {entry.audience!r}."),
        (jwt.InvalidIssuerError, f"JWT issuer does not match; this gateway accepts {entry.issuer!r}."),
        (jwt.InvalidSignatureError, "JWT signature does not verify: the token was altered or signed by another key."),
        (jwt.MissingRequiredClaimError, f"JWT lacks the required claim {getattr(exc, 'claim', '')!r}."),
    )
    return next((text for kind, text in reasons if isinstance(exc, kind)),
                f"JWT could not be verified ({type(exc).__name__}).")


def _either(algorithms: Sequence[str]) -> str:
    """("RS256", "ES256") -> "RS256 or ES256"."""
    return " or ".join(algorithms) if len(algorithms) < 3 else ", ".join(algorithms[:-1]) + " or " + algorithms[-1]


def unverified_claims(token: str) -> dict:
    """The claims of a JWT, signature unchecked: only to pick the issuer entry (or for `policy explain`)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise Unauthenticated("The credential looks like a JWT but is malformed.") from exc
    return claims


def _header(token: str) -> dict:
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Unauthenticated("The credential looks like a JWT but is malformed.") from exc
