"""Secrets: the master key, AES-GCM for provider keys, keyed hashes for tokens and pseudonyms.

The master key (32 bytes) comes from env `TOLLWAY_MASTER_KEY` (base64) or `DIR/master.key`.
Purpose-specific subkeys are derived from it with HMAC, so a token hash or a pseudonym never
reveals anything about the key that encrypts provider keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_KEY_ENV = "TOLLWAY_MASTER_KEY"
MASTER_KEY_FILE = "master.key"


class SecretError(ValueError):
    """A secret is missing, malformed, or does not decrypt."""


class Secret:
    """A string that never shows itself in `repr`, `str`, logs or tracebacks.

    >>> Secret("sk-live-123")
    Secret('****')
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The real value: call only where the outgoing header is built."""
        return self._value

    def fingerprint(self) -> str:
        """The last four characters, as `keys list` shows them."""
        return "…" + self._value[-4:] if len(self._value) >= 8 else "…"

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)


def generate_master_key() -> bytes:
    return secrets.token_bytes(32)


def write_master_key(data_dir: Path) -> Path:
    """Create `DIR/master.key` (mode 0600) unless it exists; return its path."""
    path = data_dir / MASTER_KEY_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(base64.b64encode(generate_master_key()).decode() + "\n")
    return path


def load_master_key(data_dir: Path) -> bytes:
    """The deployment's master key: env `TOLLWAY_MASTER_KEY` first, then `DIR/master.key`."""
    encoded = os.environ.get(MASTER_KEY_ENV)
    source = f"env {MASTER_KEY_ENV}"
    if not encoded:
        path = data_dir / MASTER_KEY_FILE
        if not path.exists():
            raise SecretError(
                f"no master key: set {MASTER_KEY_ENV} (base64 of 32 bytes) or run `tollway init {data_dir}`"
            )
        encoded, source = path.read_text().strip(), str(path)
    try:
        key = base64.b64decode(encoded, validate=True)
    except ValueError as exc:
        raise SecretError(f"master key from {source} is not valid base64") from exc
    if len(key) != 32:
        raise SecretError(f"master key from {source} must be 32 bytes, got {len(key)}")
    return key


class Keyring:
    """Everything derived from the master key."""

    def __init__(self, master_key: bytes) -> None:
        self._aead = AESGCM(_derive(master_key, b"tollway/provider-keys"))
        self._token_key = _derive(master_key, b"tollway/token-hash")
        self._pseudonym_key = _derive(master_key, b"tollway/pseudonym")
        self._check = _derive(master_key, b"tollway/key-check").hex()[:32]

    def encrypt(self, plaintext: str, context: str) -> bytes:
        """AES-GCM with a random nonce; `context` (the key id) is bound as associated data."""
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, plaintext.encode(), context.encode())

    def decrypt(self, blob: bytes, context: str) -> Secret:
        try:
            return Secret(self._aead.decrypt(blob[:12], blob[12:], context.encode()).decode())
        except InvalidTag as exc:
            raise SecretError(f"key {context!r} does not decrypt: wrong master key or altered row") from exc

    def check_value(self) -> str:
        """A fingerprint of the master key, stored in control.db to catch a wrong key early."""
        return self._check

    def token_hash(self, token: str) -> str:
        return hmac.new(self._token_key, token.encode(), hashlib.sha256).hexdigest()

    def pseudonym_key(self) -> bytes:
        return self._pseudonym_key


def new_client_token() -> str:
    """A fresh client token: `tw_` and 43 URL-safe characters (256 bits)."""
    return "tw_" + secrets.token_urlsafe(32)


def _derive(master_key: bytes, purpose: bytes) -> bytes:
    return hmac.new(master_key, purpose, hashlib.sha256).digest()
