"""Where the control store lives: `[control] url` in tollway.toml, read in this one place.

    [control]
    url = "control.db"                                  # default: SQLite in the deployment directory
    url = "postgresql://tollway@db.internal:5432/tollway"   # several gateway machines

A password is best left out of the URL (libpq's `PGPASSWORD` or `~/.pgpass` supply it); one written
into the URL anyway is replaced by `***` in every message (`redact`).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
Target = Path | str  # a SQLite file, or a PostgreSQL URL


def is_postgres(target: Target) -> bool:
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def resolve(url: str, data_dir: Path) -> Target:
    """`[control] url` as a target: a PostgreSQL URL as written, else a SQLite file relative to `data_dir`."""
    if url.startswith(POSTGRES_SCHEMES):
        return url
    return (data_dir / Path(url.removeprefix("sqlite://")).expanduser()).resolve()


def control_target(data_dir: Path) -> Target:
    """The deployment's control store, from its tollway.toml (`SettingsError` if that cannot be read)."""
    from proxy.settings import load_settings

    return load_settings(data_dir).control_target


def redact(text: object, target: Target | None = None) -> str:
    """`text` with any password of a PostgreSQL URL (in it, or `target`'s) replaced by `***`."""
    text = re.sub(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", r"\1***@", str(text))
    if is_postgres(target):
        password = urlsplit(target).password
        if password:
            text = text.replace(password, "***")
    return text


def describe(target: Target) -> str:
    """`target` for messages: the redacted URL or the file's path."""
    return redact(target) if is_postgres(target) else str(target)
