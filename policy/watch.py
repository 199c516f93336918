"""Hot reload: notice edits to the policy files, validate the whole set, swap it in atomically.

The watcher polls file metadata and the provider keys (cheap, works on every filesystem and editor:
a key added with the CLI can make a refused set valid), and on a change
rebuilds the complete set off the event loop. A valid set replaces the old one as a single
reference assignment, so a request sees either the old set or the new one, never a mix; requests
in flight keep the set they started with. An invalid set is refused whole and reported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from policy.files import POLICY_FILES, file_hashes
from policy.loader import PolicyInvalid, PolicySet, load_policy_set

log = logging.getLogger("tollway.policy")


def files_signature(data_dir: Path) -> tuple:
    """(name, mtime, size) of every policy file: changes whenever a file is saved."""
    out = []
    for name in POLICY_FILES:
        try:
            stat = (data_dir / name).stat()
            out.append((name, stat.st_mtime_ns, stat.st_size))
        except FileNotFoundError:
            out.append((name, None, None))
    return tuple(out)


class PolicyWatcher:
    def __init__(self, data_dir: Path, current: Callable[[], PolicySet], keys: Callable[[], dict],
                 on_loaded: Callable[[PolicySet], None], on_refused: Callable[[PolicyInvalid, dict], None],
                 on_unchanged: Callable[[], None], interval_s: float = 1.0) -> None:
        self._data_dir = data_dir
        self._current = current
        self._keys = keys
        self._on_loaded = on_loaded
        self._on_refused = on_refused
        self._on_unchanged = on_unchanged
        self._interval = interval_s
        self._signature = self._full_signature()

    def _full_signature(self) -> tuple:
        """The files' metadata and the provider keys the routes are checked against (the CLI may change them)."""
        keys = tuple(sorted((k.key_id, k.provider, k.owner_tenant, k.status) for k in self._keys().values()))
        return files_signature(self._data_dir), keys

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:  # the watcher must outlive any surprise; the old policy stays
                log.exception("policy reload failed unexpectedly; the previous policy stays in force")

    async def check(self) -> bool:
        """Reload if the files changed since the last look; True if a new set was swapped in."""
        signature = await asyncio.to_thread(self._full_signature)  # stats files, may reload control.db
        if signature == self._signature:
            return False
        keys_changed = signature[1] != self._signature[1]
        self._signature = signature
        hashes = await asyncio.to_thread(file_hashes, self._data_dir)
        if hashes == self._current().files.hashes and not keys_changed:
            self._on_unchanged()  # saved without a change, or an edit undone: the set in force is valid
            return False
        try:
            new = await asyncio.to_thread(load_policy_set, self._data_dir, self._keys())
        except PolicyInvalid as exc:
            self._on_refused(exc, hashes)
            return False
        self._on_loaded(new)
        return True
