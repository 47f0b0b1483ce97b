"""API key secrets: generation, shape checks, hashing, comparison.

Keys we create are `as-` + `secrets.token_urlsafe(32)` (256 bits of entropy); the prefix lets secret
scanners recognise them. Operators may also bring their own secret (the deployment's
ALTER_SERVE_ADMIN_KEY), made the way platform teams make secrets: `openssl rand -hex 32`,
`openssl rand -base64 32`, a password manager. Such a secret needs no prefix; it must be long and
varied enough to be unguessable (`imported_secret_problem`).

Only `sha256(secret)` is stored, plus the first 8 characters for display. A slow password hash
(bcrypt, argon2) exists to slow down guessing of *low*-entropy secrets; against a 128-bit-plus random
token guessing is hopeless anyway, so a single sha256 is enough and keeps authentication at
microseconds per request.

Lookup is by the hash (an indexed equality), and the stored hash is then compared again with
`hmac.compare_digest`, so no step compares secret-derived bytes in variable time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import string
from pathlib import Path

KEY_PREFIX = "as-"
DISPLAY_CHARS = 8
TOKEN_BYTES = 32
# `openssl rand -hex 16` is 32 characters (128 bits): the shortest secret worth accepting.
MIN_SECRET_CHARS = 32
# Generated keys are 46 characters; bounding the length keeps a client from making us hash megabytes.
MAX_SECRET_CHARS = 128
# A 32-character secret drawn from fewer symbols than this is a pattern ("aaaa...", "0101..."), not a
# random token: hex output of 32+ characters practically always shows more than 8 of its 16 digits.
MIN_DISTINCT_CHARS = 8
_SECRET_ALPHABET = frozenset(string.ascii_letters + string.digits + string.punctuation)


PLACEHOLDER_PREFIX = "replace-with-"  # .env.example's placeholders start so


def new_secret() -> str:
    """A fresh high-entropy key secret, `as-<43 url-safe characters>`."""
    return KEY_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def hash_secret(secret: str) -> str:
    """Hex sha256 of the full secret: what the database stores."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def display_prefix(secret: str) -> str:
    """The first 8 characters, enough to tell keys apart in a listing, useless to guess from."""
    return secret[:DISPLAY_CHARS]


def looks_like_secret(secret: object) -> bool:
    """Cheap shape check before hashing: printable ASCII without spaces, of a length a key can have.
    Anything else cannot be a key, so it is refused without a database read."""
    return (isinstance(secret, str) and MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_CHARS
            and _SECRET_ALPHABET.issuperset(secret))


def imported_secret_problem(secret: str) -> str | None:
    """Why an operator-chosen secret cannot be a key (None when it can), said so that the operator
    knows what to do: every secret made by `openssl rand -hex 32` passes."""
    advice = "generate one with `openssl rand -hex 32`"
    if secret.startswith(PLACEHOLDER_PREFIX):
        # .env.example's value is public: a deploy that kept it would run with a known admin key.
        return f"it is the placeholder of .env.example, which anyone can read, not a secret: {advice}"
    if len(secret) < MIN_SECRET_CHARS:
        return f"it has {len(secret)} characters; a key needs at least {MIN_SECRET_CHARS}: {advice}"
    if len(secret) > MAX_SECRET_CHARS:
        return f"it has {len(secret)} characters; a key has at most {MAX_SECRET_CHARS}: {advice}"
    if not _SECRET_ALPHABET.issuperset(secret):
        return f"it contains spaces or characters outside printable ASCII: {advice}"
    if len(set(secret)) < MIN_DISTINCT_CHARS:
        return f"it uses only {len(set(secret))} distinct characters, a pattern rather than a random secret: {advice}"
    return None


def hashes_match(stored_hash: str, secret: str) -> bool:
    """Constant-time check that `secret` hashes to `stored_hash`."""
    return hmac.compare_digest(stored_hash.encode("ascii"), hash_secret(secret).encode("ascii"))


def write_secret_file(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only, and atomically: the file is created 0600
    under a temporary name (never world-readable, not even between create and chmod) and renamed
    into place, so a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
