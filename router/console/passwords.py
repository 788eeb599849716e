"""Console password hashes: scrypt with a random salt, stored as one self-describing string.

Format: ``scrypt$n=16384,r=8,p=1$<salt, base64>$<key, base64>`` (standard base64, 16-byte salt,
32-byte key). ``router console hash-password`` prints one for ``console.users``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

SCHEME = "scrypt"
COST = 2**14
BLOCK_SIZE = 8
PARALLELISM = 1
SALT_BYTES = 16
KEY_BYTES = 32
_FORMAT = re.compile(
    r"scrypt\$n=(?P<n>\d+),r=(?P<r>\d+),p=(?P<p>\d+)\$(?P<salt>[A-Za-z0-9+/=]+)\$(?P<key>[A-Za-z0-9+/=]+)"
)
EXPECTED = "scrypt$n=16384,r=8,p=1$<salt>$<key> (run `router console hash-password`)"


@dataclass(frozen=True)
class PasswordHash:
    """A parsed hash: scrypt parameters, salt and derived key."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @classmethod
    def parse(cls, encoded: str) -> PasswordHash:
        """The hash in ``encoded``, or ValueError saying what was expected."""
        match = _FORMAT.fullmatch(encoded.strip())
        if match is None:
            raise ValueError(f"not a password hash; expected {EXPECTED}")
        n, r, p = int(match["n"]), int(match["r"]), int(match["p"])
        if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or n > 2**20:
            raise ValueError(f"scrypt parameters n={n},r={r},p={p} are out of range; expected {EXPECTED}")
        try:
            salt, key = (
                base64.b64decode(match["salt"], validate=True),
                base64.b64decode(match["key"], validate=True),
            )
        except binascii.Error:
            raise ValueError(f"the salt or key is not base64; expected {EXPECTED}") from None
        if len(salt) < 8 or len(key) < 16:
            raise ValueError(f"the salt or key is too short; expected {EXPECTED}")
        return cls(n, r, p, salt, key)

    def matches(self, password: str) -> bool:
        """Whether ``password`` derives this key (compared in constant time)."""
        derived = _derive(password, self.salt, self.n, self.r, self.p, len(self.key))
        return hmac.compare_digest(derived, self.key)


def _derive(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * n * r * p + 2**20
    )


def hash_password(password: str) -> str:
    """A new hash of ``password`` with a fresh random salt."""
    salt = os.urandom(SALT_BYTES)
    key = _derive(password, salt, COST, BLOCK_SIZE, PARALLELISM, KEY_BYTES)
    encode = base64.b64encode
    return (
        f"{SCHEME}$n={COST},r={BLOCK_SIZE},p={PARALLELISM}$"
        f"{encode(salt).decode('ascii')}${encode(key).decode('ascii')}"
    )


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches the stored hash ``encoded`` (False for a malformed hash)."""
    try:
        return PasswordHash.parse(encoded).matches(password)
    except ValueError:
        return False
