"""The control store: provider keys (encrypted), client tokens (hashed), credits, closed periods, objects,
and the audit log, on SQLite (`control.db`, the default) or PostgreSQL (`[control] url`).

One `ControlStore` runs the same SQL on either, through a small connection seam (`proxy.control.sqlite`,
`proxy.control.postgres`): queries are written in SQLite's dialect and translated for PostgreSQL;
write transactions are serialised on both (BEGIN IMMEDIATE / an advisory lock). The audit log is
append-only and hash-chained: each row's hash covers the previous row's hash.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from proxy.control.model import (
    EXCHANGED_KEPT_AFTER_EXPIRY,
    GENESIS_HASH,
    ClientToken,
    ControlError,
    ProviderKey,
    audit_hash,
    changed_at,
    check_name,
    iso,
    utcnow,
)
from proxy.control.schema import check_version, migrate, stored_version
from proxy.control.target import Target, describe, is_postgres
from proxy.crypto import Keyring, Secret, SecretError, new_client_token


def connect(target: Target, *, read_only: bool = False):
    """The connection seam for `target`: a SQLite file or a PostgreSQL URL (its driver imported only then)."""
    if is_postgres(target):
        from proxy.control.postgres import PostgresConnection

        return PostgresConnection(target, read_only=read_only)
    from proxy.control.sqlite import SQLiteConnection

    return SQLiteConnection(Path(target), read_only=read_only)


class ControlStore:
    """One connection to the control store. Not shared across threads.

    `ControlStore(data_dir / "control.db", keyring)` or `ControlStore("postgresql://…", keyring)`; the
    schema is created or migrated on open. `read_only=True` (the dashboard, `audit`, reports) opens an
    existing store as it is, with no master key (`keyring=None`): no secret can be read through it."""

    def __init__(self, target: Target, keyring: Keyring | None, *, actor: str = "cli",
                 read_only: bool = False) -> None:
        self.target = target
        self._db = connect(target, read_only=read_only)
        try:
            if read_only:
                check_version(stored_version(self._db)[0], describe(target))
            else:
                migrate(self._db, describe(target))
        except BaseException:
            self._db.close()
            raise
        self._keyring = keyring
        self._actor = actor
        if keyring is not None and not read_only:
            self._check_master_key()

    @property
    def backend(self) -> str:
        """"sqlite" or "postgresql"."""
        return self._db.dialect

    @property
    def pushes_changes(self) -> bool:
        """True where commits are pushed to listeners (PostgreSQL); SQLite is polled with `data_version`."""
        return self._db.pushes_changes

    def listen(self, on_change):
        """PostgreSQL: a `Listener` thread calling `on_change()` after commits elsewhere (None on SQLite)."""
        if not self.pushes_changes:
            return None
        from proxy.control.postgres import Listener

        return Listener(self.target, on_change)

    def schema_version(self) -> int | None:
        return stored_version(self._db)[0]

    def _check_master_key(self) -> None:
        """Refuse a master key other than the one this store was created with."""
        check = self._keyring.check_value()
        row = self._db.execute("SELECT value FROM meta WHERE name = 'master_key_check'").fetchone()
        if row is None:  # a new store: written once (a concurrent first writer's value wins, and is checked)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('master_key_check', ?)", (check,))
            row = self._db.execute("SELECT value FROM meta WHERE name = 'master_key_check'").fetchone()
        if row[0] != check:
            self._db.close()
            where = f"the control store at {describe(self.target)}" if self.pushes_changes else "this control.db"
            raise SecretError(f"the master key does not match {where} (check TOLLWAY_MASTER_KEY or master.key): "
                              "keys stored under it could not be decrypted")

    def close(self) -> None:
        self._db.close()

    def data_version(self) -> int:
        """Changes whenever another connection commits (SQLite) or a cached table changed (PostgreSQL): the cue
        to reload a snapshot."""
        return self._db.data_version()

    # --- provider keys -------------------------------------------------------------------------
    def add_key(self, key_id: str, provider: str, secret: str, owner_tenant: str | None) -> ProviderKey:
        check_name("key id", key_id)
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
        except self._db.integrity_errors as exc:
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
        check_name("tenant", tenant)
        if not user_id.strip():
            raise ControlError("--user must not be empty")
        for role in roles:
            check_name("role", role)
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
        check_name("tenant", tenant)
        if not amount.is_finite() or amount == 0:
            raise ControlError("--amount must be a non-zero number of USD, e.g. 250 or 99.50")
        with self._tx():
            credit_id = self._db.execute(
                "INSERT INTO credits (tenant, amount_usd, note, created_at) VALUES (?,?,?,?) RETURNING credit_id",
                (tenant, str(amount), note, iso(utcnow()))).fetchone()[0]
            self._audit("credits.added", tenant, {"amount_usd": str(amount), "note": note})
        return credit_id

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
        except self._db.integrity_errors as exc:
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
        where, args = [], []
        for condition, value in (("action = ?", action), ("ts >= ?", since)):
            if value is not None:
                where.append(condition)
                args.append(value)
        rows = self._db.execute(
            "SELECT seq, ts, action, actor, target, details, prev_hash, hash FROM audit_log "
            f"{'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY seq", args)
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

    def audit_high_water(self) -> int | None:
        """The highest audit seq ever handed out (a deleted newest entry leaves it behind)."""
        return self._db.audit_high_water()

    def last_audit(self, action: str) -> dict | None:
        entries = self._db.execute(
            "SELECT seq, ts, target, details FROM audit_log WHERE action = ? ORDER BY seq DESC LIMIT 1",
            (action,)).fetchone()
        return None if entries is None else dict(zip(("seq", "ts", "target", "details"), entries, strict=True))

    # --- read-only views (dashboard, reports) ------------------------------------------------------
    def closed_periods(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT period FROM closed_periods ORDER BY period").fetchall()]

    def closed_statements(self) -> list[tuple[str, str, str]]:
        """(period, tenant, statement JSON) of every closed period."""
        return [tuple(row) for row in self._db.execute(
            "SELECT period, tenant, statement FROM closed_statements ORDER BY period, tenant").fetchall()]

    def credit_rows(self) -> list[tuple[str, str, str | None, str]]:
        """(tenant, amount as written, note, created_at) in order."""
        return [tuple(row) for row in self._db.execute(
            "SELECT tenant, amount_usd, note, created_at FROM credits ORDER BY credit_id").fetchall()]

    def count(self, table: str) -> int:
        return self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    @property
    def connection(self):
        """The connection seam (for `control migrate`'s copy)."""
        return self._db

    def _tx(self):
        return self._db.transaction()


