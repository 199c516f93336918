"""The control plane's records and shared helpers: keys, tokens, the audit hash, times, errors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from proxy.crypto import Secret

GENESIS_HASH = "0" * 64
#: Exchanged tokens this long past their expiry are deleted at the next exchange (they can never work again).
EXCHANGED_KEPT_AFTER_EXPIRY = timedelta(days=1)


class ControlError(ValueError):
    """A control-plane request was refused; the message says why and what to do."""


class ControlUnavailable(Exception):
    """The control store cannot be reached now (PostgreSQL down or restarting): retry later. The message
    never holds a password."""


@dataclass(frozen=True, slots=True)
class ProviderKey:
    key_id: str
    provider: str
    owner_tenant: str | None  # None: owned by the operator (unified billing)
    fingerprint: str
    status: str
    created_at: str
    updated_at: str
    health: str = "ok"  # ok, or "failing: …" once the provider refused it (401/403); reset by rotate
    secret: Secret | None = None

    @property
    def owner(self) -> str:
        return self.owner_tenant or "operator"


@dataclass(frozen=True, slots=True)
class ClientToken:
    token_id: str
    tenant: str
    user_id: str
    roles: tuple[str, ...]
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    identity_source: str | None = None  # the issuer entry a POST /auth/token exchange came from

    def as_json(self) -> dict:
        return {"id": self.token_id, "tenant": self.tenant, "user": self.user_id, "roles": list(self.roles),
                "created_at": self.created_at, "expires_at": self.expires_at, "revoked_at": self.revoked_at,
                "identity_source": self.identity_source}


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def changed_at() -> str:
    """A key's `updated_at`: to the microsecond, so that two changes within a second still differ (the
    gateway tells its own unwritten failing mark from a later rotation by it)."""
    return utcnow().isoformat(timespec="microseconds").replace("+00:00", "Z")


def audit_hash(prev: str, ts: str, action: str, actor: str, target: str | None, details: str) -> str:
    payload = "\x1f".join([prev, ts, action, actor, target or "", details])
    return hashlib.sha256(payload.encode()).hexdigest()


def check_name(what: str, value: str) -> None:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@")
    if not value or not set(value) <= allowed:
        raise ControlError(f"{what} {value!r} may only hold letters, digits and - _ . @")
