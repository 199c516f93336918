"""Who is calling: a client credential becomes an `Identity`, or a 401.

The gateway's view of the control store (tokens and decrypted provider keys) is a snapshot in memory.
On SQLite it is refreshed whenever `data_version` says the CLI committed a change, so a token revoked
by `tollway tokens revoke` stops working on the very next request. On PostgreSQL a listener thread
reloads it when a commit is notified (well within a second); requests never wait on the database,
and while PostgreSQL is unreachable the last snapshot keeps serving (`/readyz` says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
from dataclasses import dataclass, replace
from datetime import datetime

from proxy.control import ClientToken, ControlStore, ProviderKey, utcnow
from proxy.crypto import Keyring
from proxy.errors import Unauthenticated

log = logging.getLogger("tollway.control")
INVALID_CREDENTIAL = ("Invalid, expired or revoked Tollway credential. "
                      "Ask your Tollway operator for a new token (`tollway tokens create`).")


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    user: str
    roles: tuple[str, ...]
    auth_method: str  # token | jwt | exchanged (a token from POST /auth/token)
    credential_id: str | None = None
    identity_source: str | None = None  # the [[auth.issuers]] entry's name; None for a plain token

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
    """An in-memory snapshot of tokens and keys, reloaded when `control.db` changes.

    Two connections: `probe`, read on the event loop only for `PRAGMA data_version` (a counter in
    WAL shared memory: no disk read, no lock wait), and `reader`, which reloads the snapshot in a
    worker thread. Requests that find a reload under way wait for it (so a revoked token fails on
    the very next request) without blocking the loop.

    A store that pushes its changes (PostgreSQL) is not polled: its listener thread reloads the
    snapshot after each notified commit, and a request only reads memory."""

    def __init__(self, probe: ControlStore, reader: ControlStore, keyring: Keyring) -> None:
        self._probe = probe
        self._reader = reader
        self._keyring = keyring
        self._lock = threading.Lock()  # one reload at a time on the reader connection
        self._reader_version = -1
        self._polls = not reader.pushes_changes
        self._probe_version = probe.data_version() if self._polls else 0
        self._reloading: asyncio.Future | None = None
        self.tokens: dict[str, _TokenEntry] = {}
        self.keys: dict[str, ProviderKey] = {}
        self.refresh()
        self._listener = None if self._polls else reader.listen(self.refresh)

    def remember(self, token: ClientToken, secret: str) -> None:
        """A token this gateway has just committed: valid here at once, before the reload that its commit
        causes (the next snapshot holds it too)."""
        token_hash = self._keyring.token_hash(secret)
        expires = datetime.fromisoformat(token.expires_at) if token.expires_at else None
        self.tokens = {**self.tokens, token_hash: _TokenEntry(token_hash, token, expires)}

    def health(self) -> str:
        """"ok", or why the control store cannot be reached (the cached snapshot keeps serving)."""
        error = self._listener.error if self._listener is not None else None
        if error is None:
            return "ok"
        return f"unreachable, serving cached tokens and keys: {error}"

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()

    def refresh(self) -> bool:
        """Reload if another connection committed since the last look; True if reloaded. Blocking:
        call it at start-up or from a thread."""
        with self._lock:
            version = self._reader.data_version()
            if version == self._reader_version:
                return False
            tokens = {
                h: _TokenEntry(h, t, datetime.fromisoformat(t.expires_at) if t.expires_at else None)
                for h, t in self._reader.tokens_by_hash().items() if t.revoked_at is None
            }
            self.tokens, self.keys, self._reader_version = tokens, self._keys(), version
            return True

    def _keys(self) -> dict[str, ProviderKey]:
        keys = {k.key_id: k for k in self._reader.list_keys(with_secrets=True)}
        for key_id, known in list(self.keys.items()):  # failing marks not yet written keep their effect
            if key_id in keys and known.health != "ok" and keys[key_id].updated_at == known.updated_at:
                keys[key_id] = replace(keys[key_id], health=known.health)
        return keys

    async def _catch_up(self, version: int) -> None:
        """Bring the snapshot up to `version` of control.db without blocking the event loop (if control.db
        cannot be read, the snapshot stays as it was)."""
        if self._reloading is None:
            self._reloading = asyncio.ensure_future(asyncio.to_thread(self.refresh))
            self._reloading.add_done_callback(lambda done: self._reloaded(done, version))
        with contextlib.suppress(Exception):  # logged by `_reloaded`: the last good snapshot stays in force
            await asyncio.shield(self._reloading)

    def _reloaded(self, done: asyncio.Future, version: int) -> None:
        self._reloading = None
        if done.cancelled() or done.exception() is not None:
            log.error("the control store could not be read; serving the snapshot loaded before: %s",
                      None if done.cancelled() else done.exception())
        else:
            self._probe_version = version

    async def authenticate(self, credential: str | None, missing_hint: str) -> Identity:
        if not credential:
            raise Unauthenticated(f"No credential sent. {missing_hint}")
        if not credential.startswith("tw_"):
            raise Unauthenticated(INVALID_CREDENTIAL)
        if self._polls:
            version = self._probe.data_version()  # the common case costs this one counter read
            if version != self._probe_version:
                await self._catch_up(version)
        token_hash = self._keyring.token_hash(credential)
        entry = self.tokens.get(token_hash)
        if entry is None or not hmac.compare_digest(entry.token_hash, token_hash):
            raise Unauthenticated(INVALID_CREDENTIAL)
        if entry.expires is not None and entry.expires <= utcnow():
            raise Unauthenticated(INVALID_CREDENTIAL)
        token = entry.token
        method = "token" if token.identity_source is None else "exchanged"
        return Identity(token.tenant, token.user_id, token.roles, method, token.token_id, token.identity_source)
