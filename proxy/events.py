"""The event record: one row per request, anonymised at construction, and its DuckDB schema.

The schema lives here and only here. `user_pseudonym` is a UUID made from an HMAC of tenant and
user id under a key derived from the deployment's master key: stable per user (spend can be
grouped), not reversible without that key. No user id, email, prompt, completion, token, provider
key or IP address is ever a field of an event.
"""

from __future__ import annotations

import hashlib
import hmac
import operator
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal

#: (column, DuckDB type) in table order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("event_id", "UUID NOT NULL"),
    ("ts", "TIMESTAMPTZ NOT NULL"),
    ("tenant", "VARCHAR"),
    ("user_pseudonym", "UUID"),
    ("auth_method", "VARCHAR"),
    ("provider", "VARCHAR"),
    ("model", "VARCHAR"),
    ("endpoint", "VARCHAR"),
    ("streamed", "BOOLEAN NOT NULL"),
    ("status_code", "INTEGER NOT NULL"),
    ("outcome", "VARCHAR NOT NULL"),
    ("key_id", "VARCHAR"),
    ("billing_mode", "VARCHAR"),
    ("input_tokens", "BIGINT"),
    ("output_tokens", "BIGINT"),
    ("cached_input_tokens", "BIGINT"),
    ("cache_write_tokens", "BIGINT"),
    ("reasoning_tokens", "BIGINT"),
    ("usage_source", "VARCHAR NOT NULL"),
    ("cost_usd", "DECIMAL(18,9)"),
    ("latency_ms", "DOUBLE"),
    ("ttfb_ms", "DOUBLE"),
    ("upstream_ms", "DOUBLE"),
    ("attempts", "INTEGER NOT NULL"),
    ("demo", "BOOLEAN NOT NULL"),
    # added with the price book; an older events.duckdb gains them at start-up (see `upgrade_columns`)
    ("cache_write_1h_tokens", "BIGINT"),
    ("input_audio_tokens", "BIGINT"),
    ("output_audio_tokens", "BIGINT"),
    ("web_search_calls", "BIGINT"),
    ("service_tier", "VARCHAR"),
    ("priced_model", "VARCHAR"),
    ("price_source", "VARCHAR"),
    # added with identity for machines: the [[auth.issuers]] entry's name (NULL for a plain token)
    ("identity_source", "VARCHAR"),
)
OUTCOMES = ("ok", "denied", "rate_limited", "budget_exceeded", "unauthenticated", "bad_request",
            "upstream_error", "timeout", "cancelled", "internal_error")

CREATE_TABLE = "CREATE TABLE IF NOT EXISTS events (\n    " + ",\n    ".join(
    f"{name} {kind}" for name, kind in COLUMNS) + "\n)"


def missing_columns(existing: list[str]) -> list[str]:
    """`ALTER TABLE` statements that bring a table with these columns up to `COLUMNS` (new ones are
    nullable and come last, so the table's column order stays that of `COLUMNS`)."""
    have = set(existing)
    return [f"ALTER TABLE events ADD COLUMN {name} {kind}" for name, kind in COLUMNS if name not in have]


@dataclass(slots=True)
class Event:
    event_id: uuid.UUID
    ts: datetime
    tenant: str | None = None
    user_pseudonym: uuid.UUID | None = None
    auth_method: str | None = None  # token | jwt | exchanged
    provider: str | None = None
    model: str | None = None  # provider/model
    endpoint: str | None = None
    streamed: bool = False
    status_code: int = 0
    outcome: str = "ok"
    key_id: str | None = None
    billing_mode: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    usage_source: str = "none"
    cost_usd: Decimal | None = None
    latency_ms: float | None = None
    ttfb_ms: float | None = None
    upstream_ms: float | None = None
    attempts: int = 0
    demo: bool = field(default=False)
    cache_write_1h_tokens: int | None = None
    input_audio_tokens: int | None = None
    output_audio_tokens: int | None = None
    web_search_calls: int | None = None
    service_tier: str | None = None  # as the provider reported it
    priced_model: str | None = None  # the model id priced: the book's id, an override's exact name, or the id sent (glob override)
    price_source: str | None = None  # "override" or "genai-prices X.Y.Z"
    identity_source: str | None = None  # the issuer entry of a JWT or exchanged token; None: a plain token

    def row(self) -> tuple:
        """The values in `COLUMNS` order."""
        return _row(self)


assert tuple(f.name for f in fields(Event)) == tuple(name for name, _ in COLUMNS), "Event and COLUMNS differ"
_row = operator.attrgetter(*(name for name, _ in COLUMNS))


class Pseudonymizer:
    """`pseudonym(tenant, user)`: a stable UUID, keyed so it cannot be reversed or guessed."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._cache: dict[tuple[str, str], uuid.UUID] = {}

    def __call__(self, tenant: str, user: str) -> uuid.UUID:
        found = self._cache.get((tenant, user))
        if found is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            digest = bytearray(hmac.new(self._key, f"{tenant}\x00{user}".encode(), hashlib.sha256).digest()[:16])
            digest[6] = (digest[6] & 0x0F) | 0x80  # version 8: custom
            digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
            found = self._cache[(tenant, user)] = uuid.UUID(bytes=bytes(digest))
        return found
