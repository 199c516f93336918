"""`control.db`: provider keys (encrypted), client tokens (hashed), credits, and the audit log.

SQLite in WAL mode, so the CLI can change it while the gateway runs. The gateway keeps an
in-memory snapshot and re-reads it when `PRAGMA data_version` says another connection committed.
The audit log is append-only and hash-chained: each row's hash covers the previous row's hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from proxy.crypto import Keyring, Secret, SecretError, new_client_token

SCHEMA = """
CREATE TABLE IF NOT EXISTS provider_keys (
    key_id TEXT PRIMARY KEY, provider TEXT NOT NULL, owner_tenant TEXT,
    ciphertext BLOB NOT NULL, fingerprint TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'active',
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, health TEXT NOT NULL DEFAULT 'ok');
CREATE TABLE IF NOT EXISTS client_tokens (
    token_id TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
    user_id TEXT NOT NULL, roles TEXT NOT NULL, created_at TEXT NOT NULL,
    expires_at TEXT, revoked_at TEXT, identity_source TEXT);
CREATE TABLE IF NOT EXISTS credits (
    credit_id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, amount_usd TEXT NOT NULL,
    note TEXT, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS closed_periods (period TEXT PRIMARY KEY, closed_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS closed_statements (
    period TEXT NOT NULL, tenant TEXT NOT NULL, statement TEXT NOT NULL, PRIMARY KEY (period, tenant));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS owned_objects (
    provider TEXT NOT NULL, object_id TEXT NOT NULL, kind TEXT NOT NULL, tenant TEXT NOT NULL,
    user_pseudonym TEXT, key_id TEXT, created_at TEXT NOT NULL, PRIMARY KEY (provider, object_id));
CREATE TABLE IF NOT EXISTS metered_results (
    provider TEXT NOT NULL, object_id TEXT NOT NULL, metered_at TEXT NOT NULL, PRIMARY KEY (provider, object_id));
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, action TEXT NOT NULL,
    actor TEXT NOT NULL, target TEXT, details TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
"""
GENESIS_HASH = "0" * 64
#: Exchanged tokens this long past their expiry are deleted at the next exchange (they can never work again).
EXCHANGED_KEPT_AFTER_EXPIRY = timedelta(days=1)


class ControlError(ValueError):
    """A control-plane request was refused; the message says why and what to do."""


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


class ControlStore:
    """One connection to `control.db`. Not shared across threads."""

    def __init__(self, path: Path, keyring: Keyring, *, actor: str = "cli") -> None:
        new = not path.exists()
        if new:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(provider_keys)")}
        if "health" not in columns:  # control.db from before key health existed
            self._db.execute("ALTER TABLE provider_keys ADD COLUMN health TEXT NOT NULL DEFAULT 'ok'")
        if "identity_source" not in {row[1] for row in self._db.execute("PRAGMA table_info(client_tokens)")}:
            self._db.execute("ALTER TABLE client_tokens ADD COLUMN identity_source TEXT")  # before token exchange
        self._keyring = keyring
        self._actor = actor
        self._check_master_key()

    def _check_master_key(self) -> None:
        """Refuse a master key other than the one this control.db was created with."""
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('master_key_check', ?)", (self._keyring.check_value(),))
        stored = self._db.execute("SELECT value FROM meta WHERE name = 'master_key_check'").fetchone()[0]
        if stored != self._keyring.check_value():
            self._db.close()
            raise SecretError("the master key does not match this control.db (check TOLLWAY_MASTER_KEY or "
                              "master.key): keys stored under it could not be decrypted")

    def close(self) -> None:
        self._db.close()

    def data_version(self) -> int:
        """Changes whenever another connection commits: the cue to reload a snapshot."""
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    # --- provider keys -------------------------------------------------------------------------
    def add_key(self, key_id: str, provider: str, secret: str, owner_tenant: str | None) -> ProviderKey:
        _check_name("key id", key_id)
        if not secret.strip():
            raise ControlError("the provider key read from stdin is empty")
        now = iso(utcnow())
        try:
            with self._tx():
                self._db.execute(
                    "INSERT INTO provider_keys VALUES (?,?,?,?,?,'active',?,?,'ok')",
                    (key_id, provider, owner_tenant, self._keyring.encrypt(secret.strip(), key_id),
                     Secret(secret.strip()).fingerprint(), now, now))
                self._audit("key.added", key_id, {"provider": provider, "owner": owner_tenant or "operator"})
        except sqlite3.IntegrityError as exc:
            raise ControlError(f"key {key_id!r} exists already; use `tollway keys rotate {key_id}`") from exc
        return self.get_key(key_id)

    def rotate_key(self, key_id: str, secret: str) -> ProviderKey:
        self.get_key(key_id)
        if not secret.strip():
            raise ControlError("the provider key read from stdin is empty")
        with self._tx():
            self._db.execute(
                "UPDATE provider_keys SET ciphertext=?, fingerprint=?, status='active', health='ok', updated_at=? "
                "WHERE key_id=?",
                (self._keyring.encrypt(secret.strip(), key_id), Secret(secret.strip()).fingerprint(),
                 changed_at(), key_id))
            self._audit("key.rotated", key_id, {})
        return self.get_key(key_id)

    def revoke_key(self, key_id: str) -> ProviderKey:
        self.get_key(key_id)
        with self._tx():
            self._db.execute("UPDATE provider_keys SET status='revoked', updated_at=? WHERE key_id=?",
                             (iso(utcnow()), key_id))
            self._audit("key.revoked", key_id, {})
        return self.get_key(key_id)

    def mark_key_failing(self, key_id: str, reason: str) -> None:
        """The provider refused this key: skip it until it is rotated (`keys list` shows why)."""
        with self._tx():
            self._db.execute("UPDATE provider_keys SET health=?, updated_at=? WHERE key_id=?",
                             (f"failing: {reason}", changed_at(), key_id))
            self._audit("key.failing", key_id, {"reason": reason})

    def get_key(self, key_id: str) -> ProviderKey:
        keys = [k for k in self.list_keys() if k.key_id == key_id]
        if not keys:
            raise ControlError(f"no key {key_id!r}; `tollway keys list` shows the keys")
        return keys[0]

    def list_keys(self, *, with_secrets: bool = False) -> list[ProviderKey]:
        rows = self._db.execute(
            "SELECT key_id, provider, owner_tenant, fingerprint, status, created_at, updated_at, health, ciphertext "
            "FROM provider_keys ORDER BY key_id").fetchall()
        return [ProviderKey(*row[:8], secret=self._keyring.decrypt(row[8], row[0]) if with_secrets else None)
                for row in rows]

    # --- client tokens -------------------------------------------------------------------------
    def create_token(self, tenant: str, user_id: str, roles: list[str],
                     expires_at: datetime | None) -> tuple[ClientToken, str]:
        """Issue a token; the plain token is returned once and only its keyed hash is stored."""
        _check_name("tenant", tenant)
        if not user_id.strip():
            raise ControlError("--user must not be empty")
        for role in roles:
            _check_name("role", role)
        with self._tx():
            token_id, token = self._insert_token(tenant, user_id, roles, expires_at, None)
            self._audit("token.issued", token_id, {"tenant": tenant, "roles": roles,
                                                    "expires_at": iso(expires_at) if expires_at else None})
        return self.get_token(token_id), token

    def exchange_token(self, tenant: str, user_id: str, roles: list[str], expires_at: datetime, issuer: str,
                       user_pseudonym: str) -> tuple[ClientToken, str]:
        """Issue a short-lived token for a verified JWT (POST /auth/token), in one transaction with its audit
        entry (issuer, the user's pseudonym, expiry: never the token nor the user id). Exchanged tokens
        long expired are deleted on the way."""
        now = utcnow()
        with self._tx():
            self._db.execute("DELETE FROM client_tokens WHERE identity_source IS NOT NULL AND expires_at < ?",
                             (iso(now - EXCHANGED_KEPT_AFTER_EXPIRY),))
            token_id, token = self._insert_token(tenant, user_id, roles, expires_at, issuer)
            self._audit("token.exchanged", token_id, {"issuer": issuer, "tenant": tenant, "roles": roles,
                                                       "user_pseudonym": user_pseudonym,
                                                       "expires_at": iso(expires_at)})
        return self.get_token(token_id), token

    def _insert_token(self, tenant: str, user_id: str, roles: list[str], expires_at: datetime | None,
                      identity_source: str | None) -> tuple[str, str]:
        """(token id, plain token); inside the caller's transaction."""
        token = new_client_token()
        token_id = "tok_" + secrets.token_hex(6)
        self._db.execute(
            "INSERT INTO client_tokens (token_id, token_hash, tenant, user_id, roles, created_at, expires_at, "
            "identity_source) VALUES (?,?,?,?,?,?,?,?)",
            (token_id, self._keyring.token_hash(token), tenant, user_id, json.dumps(roles),
             iso(utcnow()), iso(expires_at) if expires_at else None, identity_source))
        return token_id, token

    def revoke_token(self, token_id: str) -> ClientToken:
        self.get_token(token_id)
        with self._tx():
            self._db.execute("UPDATE client_tokens SET revoked_at=? WHERE token_id=? AND revoked_at IS NULL",
                             (iso(utcnow()), token_id))
            self._audit("token.revoked", token_id, {})
        return self.get_token(token_id)

    def get_token(self, token_id: str) -> ClientToken:
        found = [t for _, t in self._token_rows("WHERE token_id=?", (token_id,))]
        if not found:
            raise ControlError(f"no token {token_id!r}; `tollway tokens list` shows the tokens")
        return found[0]

    def list_tokens(self) -> list[ClientToken]:
        return [t for _, t in self._token_rows("ORDER BY created_at, token_id", ())]

    def tokens_by_hash(self) -> dict[str, ClientToken]:
        return dict(self._token_rows("", ()))

    def _token_rows(self, where: str, args: tuple) -> list[tuple[str, ClientToken]]:
        rows = self._db.execute(
            "SELECT token_hash, token_id, tenant, user_id, roles, created_at, expires_at, revoked_at, identity_source "
            f"FROM client_tokens {where}", args).fetchall()
        return [(r[0], ClientToken(r[1], r[2], r[3], tuple(json.loads(r[4])), r[5], r[6], r[7], r[8])) for r in rows]

    # --- credits -------------------------------------------------------------------------------
    def add_credits(self, tenant: str, amount: Decimal, note: str | None) -> int:
        _check_name("tenant", tenant)
        if not amount.is_finite() or amount == 0:
            raise ControlError("--amount must be a non-zero number of USD, e.g. 250 or 99.50")
        with self._tx():
            cur = self._db.execute("INSERT INTO credits (tenant, amount_usd, note, created_at) VALUES (?,?,?,?)",
                                   (tenant, str(amount), note, iso(utcnow())))
            self._audit("credits.added", tenant, {"amount_usd": str(amount), "note": note})
        return cur.lastrowid

    def list_credits(self) -> list[tuple[str, Decimal, str | None, str]]:
        rows = self._db.execute("SELECT tenant, amount_usd, note, created_at FROM credits ORDER BY credit_id")
        return [(t, Decimal(a), n, c) for t, a, n, c in rows.fetchall()]

    # --- closed billing periods ------------------------------------------------------------------
    def close_period(self, period: str, statements: list[dict]) -> None:
        """Freeze a period's statements (one transaction); later events for it become adjustments."""
        try:
            with self._tx():
                self._db.execute("INSERT INTO closed_periods VALUES (?, ?)", (period, iso(utcnow())))
                self._db.executemany("INSERT INTO closed_statements VALUES (?, ?, ?)",
                                     [(period, row["tenant"], json.dumps(row, default=str)) for row in statements])
                total = sum((Decimal(str(r["charges_usd"])) for r in statements), Decimal(0))
                self._audit("period.closed", period, {"tenants": sorted(r["tenant"] for r in statements),
                                                      "charges_usd": str(total)})
        except sqlite3.IntegrityError as exc:
            raise ControlError(f"period {period} is closed already; its statements are frozen") from exc

    # --- objects created through the gateway -------------------------------------------------------
    def add_object(self, row: tuple) -> None:
        """(provider, object_id, kind, tenant, user_pseudonym, key_id, created_at); the first owner stays."""
        self._db.execute("INSERT OR IGNORE INTO owned_objects VALUES (?,?,?,?,?,?,?)", row)

    def find_object(self, provider: str, object_id: str) -> tuple | None:
        return self._db.execute("SELECT * FROM owned_objects WHERE provider = ? AND object_id = ?",
                                (provider, object_id)).fetchone()

    def claim_results(self, provider: str, object_id: str) -> bool:
        """True once per (provider, object): whoever claims first meters a batch's results."""
        cursor = self._db.execute("INSERT OR IGNORE INTO metered_results VALUES (?,?,?)",
                                  (provider, object_id, iso(utcnow())))
        return cursor.rowcount == 1

    # --- audit ---------------------------------------------------------------------------------
    def audit(self, action: str, target: str | None, details: dict) -> None:
        """Append one entry (its own transaction)."""
        with self._tx():
            self._audit(action, target, details)

    def audit_entries(self, action: str | None = None, since: str | None = None) -> list[dict]:
        """Entries in order, optionally only one action and those at or after an ISO timestamp."""
        rows = self._db.execute(
            "SELECT seq, ts, action, actor, target, details, prev_hash, hash FROM audit_log "
            "WHERE (?1 IS NULL OR action = ?1) AND (?2 IS NULL OR ts >= ?2) ORDER BY seq", (action, since))
        cols = ("seq", "ts", "action", "actor", "target", "details", "prev_hash", "hash")
        return [dict(zip(cols, row, strict=True)) for row in rows.fetchall()]

    def _audit(self, action: str, target: str | None, details: dict) -> None:
        last = self._db.execute("SELECT hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        prev = last[0] if last else GENESIS_HASH
        ts, body = iso(utcnow()), json.dumps(details, sort_keys=True, separators=(",", ":"))
        digest = audit_hash(prev, ts, action, self._actor, target, body)
        self._db.execute(
            "INSERT INTO audit_log (ts, action, actor, target, details, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
            (ts, action, self._actor, target, body, prev, digest))

    def _tx(self):
        return _Transaction(self._db)


def audit_hash(prev: str, ts: str, action: str, actor: str, target: str | None, details: str) -> str:
    payload = "\x1f".join([prev, ts, action, actor, target or "", details])
    return hashlib.sha256(payload.encode()).hexdigest()


class _Transaction:
    """`BEGIN IMMEDIATE … COMMIT`, rolled back on error: nothing is half-applied."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _check_name(what: str, value: str) -> None:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@")
    if not value or not set(value) <= allowed:
        raise ControlError(f"{what} {value!r} may only hold letters, digits and - _ . @")
