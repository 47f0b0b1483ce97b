"""API key secrets: generation, hashing, comparison.

A key is `as-` + `secrets.token_urlsafe(32)` (256 bits of entropy). Only `sha256(secret)` is stored,
plus the first 8 characters for display. A slow password hash (bcrypt, argon2) exists to slow down
guessing of *low*-entropy secrets; against a 256-bit random token guessing is hopeless anyway, so a
single sha256 is enough and keeps authentication at microseconds per request.

Lookup is by the hash (an indexed equality), and the stored hash is then compared again with
`hmac.compare_digest`, so no step compares secret-derived bytes in variable time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "as-"
DISPLAY_CHARS = 8
TOKEN_BYTES = 32
# token_urlsafe(32) is 43 characters; anything much longer is not one of ours. Bounding it keeps a
# client from making us hash megabytes per request.
MAX_SECRET_CHARS = 128


def new_secret() -> str:
    """A fresh high-entropy key secret, `as-<43 url-safe characters>`."""
    return KEY_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def hash_secret(secret: str) -> str:
    """Hex sha256 of the full secret: what the database stores."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def display_prefix(secret: str) -> str:
    """The first 8 characters (`as-` + 5), enough to tell keys apart in a listing, useless to guess from."""
    return secret[:DISPLAY_CHARS]


def looks_like_secret(secret: object) -> bool:
    """Cheap shape check before hashing: a string with our prefix and a sane length."""
    return isinstance(secret, str) and secret.startswith(KEY_PREFIX) and len(secret) <= MAX_SECRET_CHARS


def hashes_match(stored_hash: str, secret: str) -> bool:
    """Constant-time check that `secret` hashes to `stored_hash`."""
    return hmac.compare_digest(stored_hash.encode("ascii"), hash_secret(secret).encode("ascii"))
