"""API keys: high-entropy secrets with a recognisable prefix, stored only as a hash.

A key looks like `ilx_3q2...` (prefix + 43 URL-safe characters, 256 bits). Only its SHA-256 is
stored; a fast hash is enough because the secret is random, not a password. The key id
(`key_...`) is public and may appear in logs and messages; the key itself never does.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "ilx_"
KEY_ID_PREFIX = "key_"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return KEY_ID_PREFIX + secrets.token_hex(8)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def display_prefix(key: str) -> str:
    """Enough of the key to recognise it in a list, far too little to use it."""
    return key[: len(KEY_PREFIX) + 4]


def looks_like_key(value: str) -> bool:
    return value.startswith(KEY_PREFIX) and 20 < len(value) < 200
