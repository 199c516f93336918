"""Who is calling: a client credential becomes an `Identity`, or a 401.

The gateway's view of `control.db` (tokens and decrypted provider keys) is a snapshot refreshed
whenever SQLite's `data_version` says the CLI committed a change, so a token revoked by
`tollway tokens revoke` stops working on the very next request.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime

from proxy.control import ClientToken, ControlStore, ProviderKey, utcnow
from proxy.crypto import Keyring
from proxy.errors import Unauthenticated

INVALID_CREDENTIAL = ("Invalid, expired or revoked Tollway credential. "
                      "Ask your Tollway operator for a new token (`tollway tokens create`).")


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    user: str
    roles: tuple[str, ...]
    auth_method: str  # token | jwt
    credential_id: str | None = None

    @property
    def subjects(self) -> tuple[str, ...]:
        """The policy subjects: the user, then `role:NAME` for each role the credential carries."""
        return (self.user, *(f"role:{r}" for r in self.roles))


@dataclass(frozen=True, slots=True)
class _TokenEntry:
    token_hash: str
    token: ClientToken
    expires: datetime | None


class ControlView:
    """An in-memory snapshot of tokens and keys, reloaded when `control.db` changes."""

    def __init__(self, store: ControlStore, keyring: Keyring) -> None:
        self._store = store
        self._keyring = keyring
        self._version = -1
        self.tokens: dict[str, _TokenEntry] = {}
        self.keys: dict[str, ProviderKey] = {}
        self.refresh()

    def refresh(self) -> bool:
        """Reload if another connection committed since the last look; True if reloaded."""
        version = self._store.data_version()
        if version == self._version:
            return False
        self._version = version
        self.tokens = {
            h: _TokenEntry(h, t, datetime.fromisoformat(t.expires_at) if t.expires_at else None)
            for h, t in self._store.tokens_by_hash().items() if t.revoked_at is None
        }
        self.keys = {k.key_id: k for k in self._store.list_keys(with_secrets=True)}
        return True

    def authenticate(self, credential: str | None, missing_hint: str) -> Identity:
        if not credential:
            raise Unauthenticated(f"No credential sent. {missing_hint}")
        if not credential.startswith("tw_"):
            raise Unauthenticated(INVALID_CREDENTIAL)
        self.refresh()
        token_hash = self._keyring.token_hash(credential)
        entry = self.tokens.get(token_hash)
        if entry is None or not hmac.compare_digest(entry.token_hash, token_hash):
            raise Unauthenticated(INVALID_CREDENTIAL)
        if entry.expires is not None and entry.expires <= utcnow():
            raise Unauthenticated(INVALID_CREDENTIAL)
        token = entry.token
        return Identity(token.tenant, token.user_id, token.roles, "token", token.token_id)
