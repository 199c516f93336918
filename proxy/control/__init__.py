"""The control plane: provider keys (encrypted), client tokens (hashed), credits, and the audit log.

One `ControlStore` over two backends, chosen by `[control] url` (`proxy.control.target`):

    store.py      ControlStore: every query, written once
    sqlite.py     control.db (the default): WAL, polled with PRAGMA data_version
    postgresql    postgres.py: advisory-locked writes, LISTEN/NOTIFY pushes changes to gateways
    schema.py     the schema as ordered migrations, applied at start-up on both
    migrate.py    `tollway control migrate`: a SQLite store copied into PostgreSQL and verified
"""

from proxy.control.model import (
    EXCHANGED_KEPT_AFTER_EXPIRY,
    GENESIS_HASH,
    ClientToken,
    ControlError,
    ControlUnavailable,
    ProviderKey,
    audit_hash,
    changed_at,
    iso,
    utcnow,
)
from proxy.control.store import ControlStore
from proxy.control.target import Target, control_target, describe, is_postgres, redact

__all__ = ["EXCHANGED_KEPT_AFTER_EXPIRY", "GENESIS_HASH", "RETRYABLE", "ClientToken", "ControlError",
           "ControlStore", "ControlUnavailable", "ProviderKey", "Target", "audit_hash", "changed_at",
           "control_target", "describe", "iso", "is_postgres", "redact", "utcnow"]


def _retryable() -> tuple[type[Exception], ...]:
    import sqlite3

    return (sqlite3.OperationalError, ControlUnavailable)


#: Errors after which a control write is retried (SQLite locked or busy; PostgreSQL unreachable).
RETRYABLE = _retryable()
