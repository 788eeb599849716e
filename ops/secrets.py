"""Secrets known to this process, and masking them wherever text is printed or stored.

Two layers work together. Known values: what the configuration says is secret (values under keys
named like secret, token, password or auth, credential headers, URL passwords and credential query
values) is
registered in :data:`SECRETS` when the configuration is loaded or a connector is built, and replaced
wherever it appears, whatever surrounds it. Patterns: credentials of any origin are masked by shape:
a URL's password and query values, ``Authorization`` values (any scheme), bearer tokens, ``whsec_``
secrets and ``token=...``-style assignments.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus, unquote

MASK = "***"
MIN_KNOWN_LENGTH = 6
"""Known values shorter than this are not masked everywhere (they would eat ordinary words and
numbers); the patterns still mask them where they stand as a URL password or a ``key=value``."""

CREDENTIAL_NAME = re.compile(r"auth|key|token|secret|sig|pass|pwd|cookie|session|credential", re.IGNORECASE)
"""Header and query parameter names whose values are credentials (``Authorization``, ``X-Api-Key``,
``access_token``, ``sig``...)."""

_CONFIG_SECRET_KEY = re.compile(r"secret|token|password|passwd|passphrase|auth", re.IGNORECASE)
_SECRET_WORD = r"password|passwd|passphrase|secret|token|authorization|api[_-]?key|credentials?"
_AUTH_SCHEMES = "basic|bearer|digest|token|negotiate"
_SECRET_FIELD = re.compile(_SECRET_WORD, re.IGNORECASE)
# Bounded repetitions keep every pattern linear on long unbroken text such as a base64 body.
_URL = re.compile(r"\b(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,30}://)(?P<rest>[^\s\"'<>`]+)")
_URL_LIST = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.-]{0,30}://)")
_SECRET_ASSIGNMENT = re.compile(
    rf"(?P<name>(?:{_SECRET_WORD})[\w-]{{0,40}})(?P<sep>[\"']?\s*[=:]\s*[\"']?)"
    rf"(?!(?:{_AUTH_SCHEMES})\s+\*\*\*)(?P<scheme>(?:{_AUTH_SCHEMES})\s+)?(?!\*\*\*)[^\s&,;\"']+",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(?P<scheme>[Bb]earer)\s+[A-Za-z0-9._~+/=-]+")
_WEBHOOK_SECRET = re.compile(r"\bwhsec_[A-Za-z0-9+/=_-]+")
_AUTH_SCHEME = re.compile(r"(?P<scheme>[A-Za-z]+)\s+(?P<credentials>\S+)")


class SecretRegistry:
    """The secret values this process knows; :meth:`mask` replaces each wherever it appears."""

    def __init__(self) -> None:
        self._values: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, value: str | None) -> None:
        """Know ``value`` as secret, also in the forms a URL gives it (percent-encoded or decoded)."""
        if not value:
            return
        forms = {value, quote(value, safe=""), quote_plus(value, safe=""), unquote(value)}
        with self._lock:
            new = {form for form in forms if len(form) >= MIN_KNOWN_LENGTH} - self._values
            if not new:
                return
            self._values |= new
            # Longest first, so a secret that contains another is masked whole.
            ordered = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(known) for known in ordered))

    def add_basic(self, username: str, password: str | None) -> None:
        """Know a basic-auth password and the ``Authorization: Basic`` value made from it."""
        if not password:
            return
        self.add(password)
        self.add(base64.b64encode(f"{username}:{password}".encode()).decode("ascii"))

    def add_header(self, value: str) -> None:
        """Know a credential header's value, its credentials without the scheme, and a Basic password."""
        self.add(value)
        parts = _AUTH_SCHEME.fullmatch(value.strip())
        if parts is None:
            return
        self.add(parts["credentials"])
        if parts["scheme"].lower() == "basic":
            try:
                decoded = base64.b64decode(parts["credentials"], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return
            username, colon, password = decoded.partition(":")
            if colon:
                self.add_basic(username, password)

    def add_url(self, url: str) -> None:
        """Know a URL's password (and the basic-auth value made from it) and its credential query values.

        Other query values (``status=active``) are left out: masked everywhere they would eat ordinary
        words; in the URL itself every query value is masked anyway.
        """
        # A broker's failover list joins its nodes' URLs with ';': each has its own password.
        for match in _URL.finditer(_URL_LIST.sub(" ", url)):
            parts = _UrlParts.parse(match["rest"])
            if parts.password is not None:
                self.add(parts.password)
                # httpx turns a URL's userinfo into an Authorization: Basic header.
                self.add_basic(unquote(parts.username), unquote(parts.password))
            for name, value in parts.query():
                if CREDENTIAL_NAME.search(name):
                    self.add(value)

    def mask(self, text: str) -> str:
        """``text`` with every known secret replaced by ``***``."""
        pattern = self._pattern
        return text if pattern is None else pattern.sub(MASK, text)


SECRETS = SecretRegistry()
"""The process's registry: filled by ``load_config`` and by connectors, read by :func:`redact`."""


@dataclass(frozen=True)
class _UrlParts:
    """A URL after its scheme, split so that its password and query values can be found and masked.

    The password runs to the last ``@`` of the URL, so one holding a raw ``@`` or ``/`` is still
    masked whole (a URL that also has an ``@`` in its path is over-masked, never under-masked).
    """

    username: str
    password: str | None
    location: str
    query_text: str | None
    fragment: str

    @classmethod
    def parse(cls, rest: str) -> _UrlParts:
        userinfo, at, after = rest.rpartition("@")
        username, password = "", None
        if at and ":" in userinfo:
            username, _, password = userinfo.partition(":")
            rest = after
        location, question, tail = rest.partition("?")
        query, hash_mark, fragment = tail.partition("#")
        if not question:
            location, hash_mark, fragment = location.partition("#")
        return cls(username, password, location, query if question else None, hash_mark + fragment)

    def query(self) -> Iterator[tuple[str, str]]:
        for parameter in (self.query_text or "").split("&"):
            name, equals, value = parameter.partition("=")
            if equals and value:
                yield unquote(name), value

    def masked(self) -> str:
        text = f"{self.username}:{MASK}@" if self.password is not None else ""
        text += self.location
        if self.query_text is not None:
            parameters = []
            for parameter in self.query_text.split("&"):
                name, equals, value = parameter.partition("=")
                parameters.append(f"{name}={MASK}" if equals and value else parameter)
            text += "?" + "&".join(parameters)
        return text + self.fragment


def _mask_url(match: re.Match[str]) -> str:
    return match["scheme"] + _UrlParts.parse(match["rest"]).masked()


def redact(text: str) -> str:
    """Mask credentials in free text: known secrets, then URL passwords and query values,
    ``Authorization``/``token=``-style values, bearer tokens and ``whsec_`` secrets."""
    text = SECRETS.mask(text)
    text = _URL.sub(_mask_url, text)
    text = _SECRET_ASSIGNMENT.sub(rf"\g<name>\g<sep>\g<scheme>{MASK}", text)
    text = _BEARER.sub(rf"\g<scheme> {MASK}", text)
    return _WEBHOOK_SECRET.sub(f"whsec_{MASK}", text)


def redact_field(name: str, value: Any) -> Any:
    """Mask a structured field: all of it when its name says secret, else any secrets inside it."""
    if _SECRET_FIELD.search(name) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {key: redact_field(str(key), item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_field(name, item) for item in value]
    return value


def redact_data(value: Any) -> Any:
    """A JSON-like value fit to print or store: every string redacted, secret-named fields masked whole."""
    return redact_field("", value)


def register_http_credentials(
    url: str, headers: Mapping[str, str], bearer: str | None, basic: tuple[str, str] | None
) -> None:
    """Register what an HTTP connector sends as credentials: the URL's, credential headers, bearer, basic."""
    SECRETS.add_url(url)
    for name, value in headers.items():
        if CREDENTIAL_NAME.search(name):
            SECRETS.add_header(value)
    SECRETS.add(bearer)
    if basic is not None:
        SECRETS.add_basic(*basic)


def register_config_secrets(data: Any, key: str = "") -> None:
    """Register the secrets in a configuration's plain data (``key`` is the name ``data`` sits under).

    Secrets are: every string under a key named like secret, token, password or auth (but a
    ``username``); the values of credential headers under ``headers``; basic-auth pairs; and the
    password and the credential query values (``access_token=``, ``api_key=``, ``sig=``...) of
    every URL.
    """
    if _CONFIG_SECRET_KEY.search(key):
        for value in _strings(data):
            SECRETS.add(value)
    if isinstance(data, Mapping):
        username, password = data.get("username"), data.get("password")
        if isinstance(username, str) and isinstance(password, str):
            SECRETS.add_basic(username, password)
        for name, value in data.items():
            if key == "headers" and isinstance(value, str) and CREDENTIAL_NAME.search(str(name)):
                SECRETS.add_header(value)
            register_config_secrets(value, str(name))
    elif isinstance(data, list):
        for item in data:
            register_config_secrets(item, key)
    elif isinstance(data, str) and "://" in data:
        SECRETS.add_url(data)


def _strings(data: Any) -> Iterator[str]:
    """The strings in ``data``, except user names: an identifier such as ``router`` masked everywhere
    would mangle every log line, and it is no credential without its password."""
    if isinstance(data, str):
        yield data
    elif isinstance(data, Mapping):
        for name, value in data.items():
            if name != "username":
                yield from _strings(value)
    elif isinstance(data, list):
        for item in data:
            yield from _strings(item)
