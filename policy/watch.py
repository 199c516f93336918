"""Hot reload: notice edits to the policy files, validate the whole set, swap it in atomically.

The watcher polls file metadata (cheap, works on every filesystem and editor), and on a change
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
                 interval_s: float = 1.0) -> None:
        self._data_dir = data_dir
        self._current = current
        self._keys = keys
        self._on_loaded = on_loaded
        self._on_refused = on_refused
        self._interval = interval_s
        self._signature = files_signature(data_dir)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:  # the watcher must outlive any surprise; the old policy stays
                log.exception("policy reload failed unexpectedly; the previous policy stays in force")

    async def check(self) -> bool:
        """Reload if the files changed since the last look; True if a new set was swapped in."""
        signature = files_signature(self._data_dir)
        if signature == self._signature:
            return False
        self._signature = signature
        hashes = await asyncio.to_thread(file_hashes, self._data_dir)
        if hashes == self._current().files.hashes:
            return False  # saved without a change
        try:
            new = await asyncio.to_thread(load_policy_set, self._data_dir, self._keys())
        except PolicyInvalid as exc:
            self._on_refused(exc, hashes)
            return False
        self._on_loaded(new)
        return True
