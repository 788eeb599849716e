"""Who is using the console, and whether a form post really comes from the console's own pages.

Sign-in: a login form (``console.users``) giving a signed session cookie (HttpOnly, SameSite=Strict,
Secure when ``console.secure_cookie``); HTTP Basic against the same users; a bearer ``console.token``;
or, only when ``console.trusted_header`` is set, a header an authenticating proxy fills in. Every POST
carries a CSRF token tied to the session (a hidden field) and an Origin (or Referer) of the console's
own origin; anything else is refused with 403 before any work is done.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from starlette.requests import Request

from router.config import ConsoleConfig
from router.console.passwords import verify_password

COOKIE = "router_console"
TOKEN_ACTOR = "api-token"
"""The operator name the audit trail gives actions made with ``console.token``."""


class Via(Enum):
    """How the operator of a request was identified."""

    SESSION = "session"
    BASIC = "basic"
    TOKEN = "token"
    PROXY = "proxy"


@dataclass(frozen=True)
class Operator:
    """A signed-in operator: the name audited for their actions, and the CSRF token of their session."""

    name: str
    via: Via
    csrf: str


class ConsoleAuth:
    """Checks credentials and CSRF tokens for one ``console:`` configuration."""

    def __init__(self, config: ConsoleConfig) -> None:
        self.config = config
        # Without a configured secret, sessions last as long as this process: a restart signs everyone out.
        secret = config.session_secret or secrets.token_urlsafe(32)
        self._key = hashlib.sha256(b"router-console:" + secret.encode("utf-8")).digest()

    def _sign(self, value: str) -> str:
        return hmac.new(self._key, value.encode("utf-8"), hashlib.sha256).hexdigest()

    def _csrf(self, session: str) -> str:
        return self._sign("csrf:" + session)

    def check_password(self, name: str, password: str) -> bool:
        """Whether ``name`` is a console user and ``password`` is theirs (same cost either way)."""
        encoded = self.config.users.get(name)
        if encoded is None:
            # Hash anyway, so the time taken does not tell which user names exist.
            verify_password(password, _DUMMY_HASH)
            return False
        return verify_password(password, encoded)

    def session_cookie(self, name: str) -> str:
        """A signed cookie value naming ``name`` until ``console.session_ttl`` from now."""
        body = {
            "user": name,
            "nonce": secrets.token_urlsafe(16),
            "expires": int(time.time() + self.config.session_ttl),
        }
        encoded = base64.urlsafe_b64encode(json.dumps(body).encode("utf-8")).decode("ascii")
        return f"{encoded}.{self._sign(encoded)}"

    def _from_cookie(self, value: str) -> Operator | None:
        encoded, _, signature = value.partition(".")
        if not hmac.compare_digest(signature, self._sign(encoded)):
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(encoded.encode("ascii")))
        except (binascii.Error, ValueError, UnicodeError):
            return None
        if body.get("expires", 0) < time.time() or body.get("user") not in self.config.users:
            return None
        return Operator(body["user"], Via.SESSION, self._csrf("session:" + body["nonce"]))

    def operator(self, request: Request) -> Operator | None:
        """The operator making ``request``, or None when it carries no valid credentials."""
        header = self.config.trusted_header
        if header and request.headers.get(header):
            name = request.headers[header].strip()
            return Operator(name, Via.PROXY, self._csrf("proxy:" + name))
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.config.token:
            if hmac.compare_digest(credentials.strip().encode(), self.config.token.encode()):
                return Operator(TOKEN_ACTOR, Via.TOKEN, self._csrf("token:"))
            return None
        if scheme.lower() == "basic" and self.config.users:
            try:
                name, _, password = base64.b64decode(credentials.strip()).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeError):
                return None
            if self.check_password(name, password):
                return Operator(name, Via.BASIC, self._csrf("basic:" + name))
            return None
        cookie = request.cookies.get(COOKIE)
        return self._from_cookie(cookie) if cookie else None

    def login_csrf(self, request: Request) -> tuple[str, str]:
        """A CSRF token for the login form and the pre-session cookie value it is tied to."""
        nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(16)
        return nonce, self._csrf("login:" + nonce)

    def login_csrf_ok(self, request: Request, token: str) -> bool:
        nonce = request.cookies.get(LOGIN_COOKIE)
        return bool(nonce) and hmac.compare_digest(token, self._csrf("login:" + str(nonce)))


LOGIN_COOKIE = "router_console_login"
_DUMMY_HASH = "scrypt$n=16384,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def same_origin(request: Request) -> bool:
    """Whether a POST's Origin (or, without one, its Referer) is the console's own origin.

    The origin is compared with the Host the request was sent to; a request with neither header (not
    sent by a browser) passes this check and still needs the session's CSRF token.
    """
    source = request.headers.get("origin") or request.headers.get("referer")
    if source is None:
        return True
    parts = urlsplit(source)
    host = request.headers.get("host", "")
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


def csrf_ok(operator: Operator, token: str) -> bool:
    """Whether a form's CSRF ``token`` belongs to the operator's session."""
    return bool(token) and hmac.compare_digest(token, operator.csrf)
