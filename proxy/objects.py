"""Objects belong to the tenant that created them through Tollway.

Every tenant reaches the provider with the operator's (or its own) keys, so on a shared key the
provider cannot tell tenant A's files from tenant B's. Tollway can: the id a create call returns
(a file, batch, stored response, upload, vector store, message batch, Gemini file or cached
content) is recorded with its tenant, its creator's pseudonym and the key that created it. Then:
- a call naming an object by id (in the path, or in a body field such as `input_file_id`) reaches
  the provider only for the owning tenant, with the key that created it; for anyone else, and
  for an id Tollway never saw, the answer is the same 404 (existence is never confirmed) unless
  operations.csv allows `PROVIDER/objects.unowned` by name (for platform admins);
- a list call returns only the caller's tenant's objects (the page is filtered; the provider's
  cursors stay as they were, so paging goes on exactly).

Owners are held in memory (the last `_MEMORY` objects) and in `control.db`, written by the
control writer off the request path; a lookup the memory cannot answer reads `control.db` in a
worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from proxy.control import ControlStore, ControlUnavailable, iso
from proxy.errors import ObjectNotFound, StoreUnavailable
from proxy.providers.objects import RULES, ObjectRules, object_id

__all__ = ["BATCH_RESULTS", "UPLOAD_SESSION", "ObjectRegistry", "Owner", "check_access", "filter_list", "object_id", "rewrite_urls",
           "rules_for"]

if TYPE_CHECKING:
    from policy.loader import PolicySet
    from proxy.auth import Identity
    from proxy.control_writer import ControlWriter

log = logging.getLogger("tollway.objects")
UNOWNED = "objects.unowned"
BATCH_RESULTS = "batch_results"  # a file holding a batch's results: owned, and metered, as the batch
UPLOAD_SESSION = "upload_session"  # a resumable upload's URL: its bytes may come without a credential
_MEMORY = 200_000


@dataclass(frozen=True, slots=True)
class Owner:
    tenant: str
    user_pseudonym: uuid.UUID | None
    key_id: str | None
    kind: str


class ObjectRegistry:
    """Who created each object: memory first, `control.db` behind it."""

    def __init__(self, open_store: Callable[[], ControlStore], writer: ControlWriter) -> None:
        self._open_store = open_store
        self._writer = writer
        self._known: dict[tuple[str, str], Owner] = {}
        self._store: ControlStore | None = None
        self._lock = threading.Lock()  # one reader connection, used by one worker thread at a time

    def record(self, provider: str, object_id: str, owner: Owner) -> None:
        """Remember a new object now; persist it through the control writer."""
        key = (provider, object_id)
        if key in self._known:
            return
        if len(self._known) >= _MEMORY:
            del self._known[next(iter(self._known))]  # the oldest: control.db still knows it
        self._known[key] = owner
        row = (provider, object_id, owner.kind, owner.tenant,
               str(owner.user_pseudonym) if owner.user_pseudonym else None, owner.key_id, iso(datetime.now(UTC)))
        self._writer.submit(f"owner of {provider} object {object_id}", lambda store: store.add_object(row))

    async def owner(self, provider: str, object_id: str) -> Owner | None:
        found = self._known.get((provider, object_id))
        if found is not None:
            return found
        row = await asyncio.to_thread(self._read, lambda s: s.find_object(provider, object_id))
        if row is None:
            return None
        _, _, kind, tenant, pseudonym, key_id, _ = row
        found = Owner(tenant, uuid.UUID(pseudonym) if pseudonym else None, key_id, kind)
        self._known.setdefault((provider, object_id), found)
        return found

    async def claim_results(self, provider: str, object_id: str) -> bool:
        """True for the first caller ever (across restarts and processes) to meter these results."""
        return await asyncio.to_thread(self._read, lambda s: s.claim_results(provider, object_id))

    def _read(self, query: Callable[[ControlStore], Any]) -> Any:
        with self._lock:
            try:
                if self._store is None:
                    self._store = self._open_store()
                return query(self._store)
            except ControlUnavailable as exc:  # PostgreSQL down: this request gets 503, the next may succeed
                raise StoreUnavailable("The control store is unreachable, so this object's owner cannot be "
                                       "checked; try again shortly.") from exc

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def rules_for(style: str) -> ObjectRules:
    return RULES.get(style, RULES["openai"])


def not_found(object_id: str) -> ObjectNotFound:
    return ObjectNotFound(f"No such object: {object_id!r}. Objects are visible only to the tenant that created "
                          "them through this gateway.")


async def check_access(registry: ObjectRegistry, policies: PolicySet, provider: str, rules: ObjectRules,
                       identity: Identity, operation: str, path_id: str | None, body: dict | None,
                       session: str | None = None) -> Owner | None:
    """Refuse (404) a call that names another tenant's object, or one never seen; return the owner of the
    first object it names (the path's, else the first referenced, else the upload `session`), whose key the
    call should use."""
    named = [path_id] if path_id is not None and rules.collection(operation) else []
    referenced = rules.referenced_ids(body)
    if not named and not referenced and not session:  # the common case: an inference call
        return None
    first = None
    for ident in [*named, *referenced, *([session] if session else [])]:
        owner = await registry.owner(provider, ident)
        if owner is None:
            if not policies.policy.decide_operation(identity.tenant, identity.subjects,
                                                    f"{provider}/{UNOWNED}").allowed:
                raise not_found(ident)
        elif owner.tenant != identity.tenant:
            raise not_found(ident)
        first = first or owner
    return first


async def filter_list(registry: ObjectRegistry, provider: str, items_key: str, payload: Any, tenant: str) -> Any:
    """A list page with only the tenant's objects (cursors such as `has_more`/`last_id` left as they were)."""
    items = payload.get(items_key) if isinstance(payload, dict) else None
    if not isinstance(items, list):
        return payload
    kept = []
    for item in items:
        ident = object_id((item.get("id") or item.get("name")) if isinstance(item, dict) else None)
        owner = await registry.owner(provider, ident) if ident else None
        if owner is not None and owner.tenant == tenant:
            kept.append(item)
    return {**payload, items_key: kept}


def rewrite_urls(payload: Any, fields: tuple[str, ...], items_key: str | None, upstream: str, public: str) -> bool:
    """Point URL fields that name the provider's host at the gateway instead (an SDK follows them with the
    client's credential: a Tollway token must never go to the provider). True if anything changed."""
    objects = [payload] + (payload.get(items_key) or [] if items_key and isinstance(payload, dict) else [])
    changed = False
    for item in objects:
        for name in fields if isinstance(item, dict) else ():
            value = item.get(name)
            if isinstance(value, str) and value.startswith(upstream):
                item[name] = public + value[len(upstream):]
                changed = True
    return changed
