"""The top-level blocks of routes.yaml: broker, store, http, console, journal and lookups."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator

from ops.secrets import redact
from router.broker import DEFAULT_CONSUMER_TIMEOUT
from router.config.common import NAME, Section
from router.config_types import Duration, Rate, Size
from router.console.passwords import PasswordHash

_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _broker_urls(value: Any) -> Any:
    """``broker.url`` as a list: one URL, a list of them, or a ``;``-separated string of them."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(";")]
    return value


def _broker_url(url: str) -> str:
    """Refuse a URL kombu would not take for a RabbitMQ node (or the embedded broker)."""
    if not url.startswith(("amqp://", "amqps://", "memory://")):
        raise ValueError(
            f"{redact(url)!r} is no broker URL; expected amqp://USER:PASSWORD@HOST:PORT/VHOST or memory://"
        )
    return url


BrokerUrls = Annotated[
    list[Annotated[str, AfterValidator(_broker_url)]], BeforeValidator(_broker_urls), Field(min_length=1)
]
"""The nodes of one RabbitMQ cluster, tried in turn on connect and reconnect."""


class BrokerConfig(Section):
    """``broker:``: RabbitMQ (amqp://) in production, the embedded memory:// broker for the demo."""

    url: BrokerUrls = Field(default_factory=lambda: ["memory://"])
    queue_type: Literal["quorum", "classic"] = "quorum"
    prefix: str = "router"
    prefetch: int = Field(4, ge=1, le=1000)
    confirm_timeout: Duration = 30.0
    consumer_timeout: Duration = Field(DEFAULT_CONSUMER_TIMEOUT, gt=0)
    """RabbitMQ's consumer_timeout for the router's queues (declared as x-consumer-timeout): how long a
    message may stay unacknowledged; every target's retries must fit in it."""

    @field_validator("url")
    @classmethod
    def _memory_alone(cls, urls: list[str]) -> list[str]:
        if len(urls) > 1 and any(url.startswith("memory://") for url in urls):
            raise ValueError(
                "memory:// is a broker inside one process and cannot fail over: give it alone, or list "
                "only the amqp:// URLs of the cluster's nodes"
            )
        return urls

    @field_validator("prefix")
    @classmethod
    def _queue_safe(cls, prefix: str) -> str:
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix {prefix!r} must be letters, digits, '.', '_' or '-' (queue names)")
        return prefix


class StoreConfig(Section):
    """``store:``: dead letters, ledgers, cursors and audit; SQLite by default, PostgreSQL in production."""

    url: str = "sqlite:///router-state.db"

    def resolved_url(self, base_dir: Path) -> str:
        """The URL with a relative SQLite path made relative to the configuration's folder."""
        prefix = "sqlite:///"
        if self.url.startswith(prefix) and not self.url.startswith(prefix + "/"):
            path = self.url.removeprefix(prefix)
            if path and path != ":memory:":
                return prefix + str((base_dir / path).resolve())
        return self.url


def _split_host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class HttpConfig(Section):
    """``http:``: the one listener for webhooks, /metrics, /healthz, /readyz and the console.

    The limits bound what slow or hostile clients can hold: connections, the time to send headers
    and body, idle keep-alive time, header size, and invalid signatures per peer address.
    ``console_listen`` serves the console on a listener of its own, never on the partners' port.
    """

    listen: str = "127.0.0.1:8080"
    console_listen: str | None = None
    enabled: bool = True
    workers: int = Field(1, ge=1, le=64)
    """Processes serving the listener (SO_REUSEPORT): one parses every request under one GIL."""
    max_connections: int = Field(1000, gt=0)
    header_timeout: Duration = Field(10.0, gt=0)
    body_timeout: Duration = Field(30.0, gt=0)
    keep_alive: Duration = Field(5.0, gt=0)
    max_header_size: Size = Field(16 * 1024, ge=1024)
    signature_failures: Rate = (20, 60.0)

    @field_validator("listen", "console_listen")
    @classmethod
    def _host_port(cls, listen: str | None) -> str | None:
        if listen is None:
            return None
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"expected HOST:PORT such as 127.0.0.1:8080, not {listen!r}")
        return listen

    @property
    def host(self) -> str:
        return _split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_host_port(self.listen)[1]

    @property
    def console_address(self) -> tuple[str, int] | None:
        """Where the console listens apart from the webhooks, or None when it shares ``listen``."""
        return _split_host_port(self.console_listen) if self.console_listen else None


class ConsoleConfig(Section):
    """``console:``: who may use the web console; closed (404) unless one way to sign in is set.

    ``users`` maps names to scrypt hashes (`router console hash-password`); ``token`` is a bearer token
    from the environment (audited as ``api-token``); ``trusted_header`` names a header set by an
    authenticating proxy, honoured only when configured here.
    """

    users: dict[str, str] = Field(default_factory=dict)
    token: str | None = Field(None, repr=False)
    trusted_header: str | None = None
    secure_cookie: bool = False
    session_secret: str | None = Field(None, repr=False)
    session_ttl: Duration = Field(8 * 3600.0, gt=0)

    @field_validator("users")
    @classmethod
    def _hashed(cls, users: dict[str, str]) -> dict[str, str]:
        for name, encoded in users.items():
            if not NAME.fullmatch(name):
                raise ValueError(f"user name {name!r} must be lowercase letters, digits, '.', '_' or '-'")
            try:
                PasswordHash.parse(encoded)
            except ValueError as error:
                raise ValueError(f"user {name!r}: {error}") from None
        return users

    @field_validator("token", "trusted_header", "session_secret")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @property
    def enabled(self) -> bool:
        """Whether any way to sign in is configured; without one the console stays closed."""
        return bool(self.users or self.token or self.trusted_header)


class JournalConfig(Section):
    """``journal:``: how long delivered events are kept for `router replay`."""

    retention: Duration = 7 * 86400.0


class LookupConfig(Section):
    """A lookup table under ``lookups:``: a CSV file and its key and value columns."""

    file: str
    key: str
    value: str
    refresh: Duration = 10.0
    """How often the file is checked for changes (a running router reloads it)."""
