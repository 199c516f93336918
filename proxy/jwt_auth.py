"""SSO / zero-trust identity: a signed JWT (e.g. from Cloudflare Access) becomes an `Identity`.

Only RS256 and ES256 are accepted (so `alg: none` and HMAC confusion are refused before any key
is looked at). Keys come from a JWKS URL, cached and refreshed when a token names an unknown `kid`
(at most once per `_REFRESH_S`), or from a static PEM public key. Issuer, audience, expiry and
not-before are always checked. A verified token is remembered until it expires, so the signature
check runs once per token, not once per request.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from proxy.auth import Identity
from proxy.errors import Unauthenticated
from proxy.settings import JwtSettings

ALGORITHMS = ("RS256", "ES256")
_REFRESH_S = 5.0
_CACHE_LIMIT = 50_000
_LEEWAY_S = 30
_MAX_IDENTIFIER = 256  # characters of a user, tenant or group name taken from a claim
_MAX_ROLES = 256


def looks_like_jwt(credential: str) -> bool:
    return credential.startswith("eyJ") and credential.count(".") == 2


class JwtVerifier:
    def __init__(self, settings: JwtSettings, data_dir: Path) -> None:
        self._settings = settings
        self._static_key: bytes | None = None
        if settings.public_key_file:
            path = Path(settings.public_key_file)
            self._static_key = (path if path.is_absolute() else data_dir / path).read_bytes()  # PEM
        self._jwks: dict[str, Any] = {}
        self._fetched_at = 0.0
        self._refreshing = asyncio.Lock()  # one JWKS fetch at a time; waiters then see its keys
        self._verified: dict[str, tuple[Identity, float]] = {}

    async def identify(self, token: str) -> Identity:
        cached = self._verified.get(token)
        if cached and cached[1] > time.time():
            return cached[0]
        header = _header(token)
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Unauthenticated(f"JWT algorithm {alg!r} is not accepted; tokens must be signed with RS256 or ES256.")
        key = self._static_key if self._static_key is not None else await self._jwks_key(header.get("kid"))
        claims = self._decode(token, key, alg)
        identity = self._identity(claims)
        if len(self._verified) >= _CACHE_LIMIT:
            self._verified.clear()
        self._verified[token] = (identity, float(claims["exp"]))
        return identity

    def _decode(self, token: str, key: Any, alg: str) -> dict:
        s = self._settings
        try:
            claims = jwt.decode(token, key, algorithms=[alg], issuer=s.issuer, audience=s.audience, leeway=_LEEWAY_S,
                                options={"require": ["exp", "iss"], "verify_aud": s.audience is not None})
        except jwt.PyJWTError as exc:
            raise Unauthenticated(self._reason(exc)) from exc
        except (TypeError, ValueError, AttributeError) as exc:  # e.g. RS256 on an EC key: the crypto library's errors
            raise Unauthenticated(f"JWT algorithm {alg!r} does not match the key its kid names.") from exc
        for name in ("exp", "nbf", "iat"):  # PyJWT accepts numeric strings here; RFC 7519 says NumericDate
            if name in claims and (not isinstance(claims[name], int | float) or isinstance(claims[name], bool)):
                raise Unauthenticated(f"JWT claim {name!r} must be a number (seconds since the epoch).")
        return claims

    def _reason(self, exc: jwt.PyJWTError) -> str:
        """A 401 message that says what was wrong with the token (never what the key is)."""
        s = self._settings
        reasons = (
            (jwt.ExpiredSignatureError, "JWT has expired: sign in again to get a fresh one."),
            (jwt.ImmatureSignatureError, "JWT is not valid yet (its nbf or iat is in the future)."),
            (jwt.InvalidAudienceError, f"JWT audience does not match; this gateway accepts {s.audience!r}."),
            (jwt.InvalidIssuerError, f"JWT issuer does not match; this gateway accepts {s.issuer!r}."),
            (jwt.InvalidSignatureError, "JWT signature does not verify: the token was altered or signed by another key."),
            (jwt.MissingRequiredClaimError, f"JWT lacks the required claim {getattr(exc, 'claim', '')!r}."),
        )
        return next((text for kind, text in reasons if isinstance(exc, kind)),
                    f"JWT could not be verified ({type(exc).__name__}).")

    def _identity(self, claims: dict) -> Identity:
        s = self._settings
        user = _identifier(claims, s.user_claim, "to identify the user")
        tenant = _identifier(claims, s.tenant_claim, "naming the tenant")
        groups = claims.get(s.roles_claim) or []
        groups = [groups] if isinstance(groups, str) else groups
        if not isinstance(groups, list) or len(groups) > _MAX_ROLES:
            raise Unauthenticated(f"JWT claim {s.roles_claim!r} must be a list of at most {_MAX_ROLES} group names.")
        roles = tuple(g for g in groups if isinstance(g, str) and g)
        if any(not _usable(r) for r in roles):
            raise Unauthenticated(f"JWT claim {s.roles_claim!r} holds a group name that is not a usable identifier "
                                  f"(at most {_MAX_IDENTIFIER} printable characters).")
        return Identity(tenant, user, roles, "jwt")

    async def _jwks_key(self, kid: str | None) -> Any:
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
                response = await client.get(self._settings.jwks_url)
                response.raise_for_status()
                keys = response.json().get("keys", [])
        except (httpx.HTTPError, ValueError) as exc:
            raise Unauthenticated("JWT keys (JWKS) could not be fetched; try again shortly.") from exc
        loaded = {}
        for jwk in keys:
            kind = {"RSA": RSAAlgorithm, "EC": ECAlgorithm}.get(jwk.get("kty"))
            if kind and jwk.get("kid"):
                loaded[jwk["kid"]] = kind.from_jwk(json.dumps(jwk))
        self._jwks = loaded


def _identifier(claims: dict, name: str, what: str) -> str:
    """A user, tenant or group name from a claim: a non-empty string of at most `_MAX_IDENTIFIER`
    printable characters (it becomes a policy subject, a log field, a metric label's candidate)."""
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise Unauthenticated(f"JWT has no {name!r} claim {what}.")
    if not _usable(value):
        raise Unauthenticated(f"JWT claim {name!r} is not a usable identifier (at most {_MAX_IDENTIFIER} printable "
                              "characters).")
    return value


def _usable(value: str) -> bool:
    return len(value) <= _MAX_IDENTIFIER and value.isprintable()


def _header(token: str) -> dict:
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Unauthenticated("The credential looks like a JWT but is malformed.") from exc
