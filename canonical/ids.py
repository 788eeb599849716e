"""Identifiers of the canonical model: deterministic event ids, GS1 check digits, sequence keys, partitions.

Everything here is a pure function whose result must not change between processes, hosts or releases:
event ids deduplicate re-ingested records and partitions decide which consumer keeps a key in order.
"""

from __future__ import annotations

import hashlib
import json
import uuid
import zlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from json.encoder import encode_basestring
from typing import Any

# Changing this namespace changes every event id, so re-ingested records would no longer deduplicate.
EVENT_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:retail-inventory-router:canonical-event")
_NAMESPACE_BYTES = EVENT_ID_NAMESPACE.bytes
# Built once, for the rare part that is not a string, an int or None: json.dumps with options
# builds an encoder per call, which cost as much as the hashing.
_PARTS_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

GTIN_LENGTHS = (8, 12, 13, 14)
GLN_LENGTH = 13
SEQUENCE_KEY_SEPARATOR = "|"


def derive_event_id(*parts: str | int | None) -> str:
    """The event id for a source record: a UUIDv5 over its identifying parts, usable as Idempotency-Key.

    The parts are JSON-encoded as a list, so ("a", "bc") and ("ab", "c") give different ids.
    """
    encoded = "[" + ",".join(map(_encoded_part, parts)) + "]"
    # uuid.uuid5 spelled out (SHA-1 of namespace and name, version 5, RFC 4122 variant) without
    # building a UUID object per event: the same text, at a fraction of the cost.
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + encoded.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _encoded_part(part: Any) -> str:
    """One part as the encoder writes it inside the list; strings, ints and None (nearly every part)
    without the encoder's per-call set-up."""
    if isinstance(part, str):
        return encode_basestring(part)
    if part is None:
        return "null"
    if type(part) is int:
        return int.__repr__(part)
    return _PARTS_ENCODER.encode(part)


def gs1_check_digit(digits: str) -> int:
    """The GS1 mod-10 check digit for ``digits`` (a GTIN, GLN or SSCC without its last digit)."""
    if not digits.isascii() or not digits.isdigit():
        raise ValueError(f"GS1 check digit: {digits!r} must be decimal digits only")
    # Weights alternate 3, 1, 3, ... from the rightmost digit, whatever the key's length.
    total = 3 * sum(map(int, digits[::-2])) + sum(map(int, digits[-2::-2]))
    return (10 - total % 10) % 10


def is_valid_gs1(number: str) -> bool:
    """Whether ``number`` is all digits (at least two) and ends in its correct GS1 check digit."""
    if len(number) < 2 or not number.isascii() or not number.isdigit():
        return False
    return gs1_check_digit(number[:-1]) == int(number[-1])


# Items and locations repeat from record to record: each distinct one is checked once per process
# (typed, so True is never taken for 1; a refused value raises every time, it is not cached).
@lru_cache(maxsize=4096, typed=True)
def normalize_gtin(value: str | int) -> str:
    """A GTIN-8, -12, -13 or -14 as its 14-digit form, after verifying the check digit.

    An int is accepted because JSON payloads often carry GTINs as numbers; the leading zeros it lost
    are exactly the padding the 14-digit form adds back. Raises ValueError saying what is wrong.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"gtin must be a string of digits, not {type(value).__name__}")
    if isinstance(value, int):
        if value < 0 or len(str(value)) > 14:
            raise ValueError(f"gtin {value} is not a GTIN: expected 8, 12, 13 or 14 digits")
        text = str(value).zfill(14)
    else:
        text = value.strip()
        if not text.isascii() or not text.isdigit() or len(text) not in GTIN_LENGTHS:
            raise ValueError(f"gtin {value!r} is not a GTIN: expected 8, 12, 13 or 14 digits")
    expected = gs1_check_digit(text[:-1])
    if int(text[-1]) != expected:
        raise ValueError(
            f"gtin {value!r} has check digit {text[-1]}, but the GS1 mod-10 check digit is {expected}"
        )
    return text.zfill(14)


@lru_cache(maxsize=4096, typed=True)
def check_gln_if_numeric(location: str) -> str:
    """``location`` unchanged; when it is exactly 13 digits it is a GLN, and its check digit must hold."""
    if len(location) == GLN_LENGTH and location.isascii() and location.isdigit():
        expected = gs1_check_digit(location[:-1])
        if int(location[-1]) != expected:
            raise ValueError(
                f"location {location!r} is 13 digits, so a GLN, but its check digit is {location[-1]}"
                f" where GS1 mod-10 gives {expected}"
            )
    return location


def sequence_key_for(event: Mapping[str, Any], fields: Sequence[str]) -> str:
    """The event's ordering key: the values of ``fields`` joined with "|".

    A missing or empty field raises ValueError naming it; "sku" falls back to the gtin when absent.
    """
    values = []
    for name in fields:
        value = event.get(name)
        if name == "sku" and _is_blank(value):
            value = event.get("gtin")
        if _is_blank(value):
            wanted = "'sku' (or 'gtin')" if name == "sku" else repr(name)
            raise ValueError(f"sequence_key field {wanted} is missing or empty in the event")
        values.append(str(value))
    return SEQUENCE_KEY_SEPARATOR.join(values)


def partition_for(key: str, partitions: int) -> int:
    """The partition in [0, partitions) of a sequence key: CRC-32, stable across processes and versions."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    return zlib.crc32(key.encode("utf-8")) % partitions


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())
