"""The routes.yaml contract as pydantic models, and `load_config`, which reports every problem at once.

`load_config` reads the file with positions (:mod:`router.config_source`), validates it against the
models below, then checks what the models alone cannot: that `deliver` names defined targets, that
lookup tables and payload schemas load, that each route's mapping, record path and conditions compile,
and that no route sends a target the kind of quantity (delta or absolute) it refuses. Every problem is
a :class:`ConfigProblem` at a line and column; secrets are never echoed.
"""

from __future__ import annotations

import difflib
import io
import json
import math
import os
import posixpath
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import jmespath
from jmespath.exceptions import JMESPathError
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from canonical.events import EVENT_MODELS, EVENT_TYPES
from connectors.file_ingest import Readiness
from connectors.file_source import PROCESSING_DIR
from connectors.file_target import DEFAULT_FILENAME, FilenamePattern
from connectors.signatures import secret_key
from ops.secrets import redact, register_config_secrets
from router.broker import DEFAULT_CONSUMER_TIMEOUT, redact_urls, retry_budget
from router.config_source import ConfigDocument, ConfigError, ConfigPath, ConfigProblem, read_document
from router.config_types import Duration, Rate, Size
from router.console.passwords import PasswordHash
from transforms.edi import EDI_FORMATS
from transforms.filters import EventPredicate
from transforms.fixed_width import LayoutError, compile_layout
from transforms.lookups import Lookup, LookupTableError
from transforms.mapping import compile_mapping
from transforms.parsers import check_records_path, iter_records

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "RouteConfig",
    "RouterConfig",
    "TargetConfig",
    "find_config_path",
    "load_config",
    "read_json_schema",
    "redact_url",
    "redact_urls",
]

DEFAULT_CONFIG = "routes.yaml"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_FIELD_IN_MESSAGE = re.compile(r"field '([^']+)'")
SET_BY_ROUTER = frozenset({"event_id", "source", "recorded_at", "sequence_key"})
"""Canonical fields the transform stage fills in itself; a route's map cannot set them."""


class _Section(BaseModel):
    """A block of routes.yaml: unknown keys are refused, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


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


class BrokerConfig(_Section):
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


class StoreConfig(_Section):
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


class HttpConfig(_Section):
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


class ConsoleConfig(_Section):
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
            if not _NAME.fullmatch(name):
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


class JournalConfig(_Section):
    """``journal:``: how long delivered events are kept for `router replay`."""

    retention: Duration = 7 * 86400.0


class LookupConfig(_Section):
    """A lookup table under ``lookups:``: a CSV file and its key and value columns."""

    file: str
    key: str
    value: str
    refresh: Duration = 10.0
    """How often the file is checked for changes (a running router reloads it)."""


class RetryConfig(_Section):
    """A target's ``retry:``: in-place retries with exponential backoff and jitter."""

    attempts: int = Field(10, ge=1)
    initial: Duration = 0.5
    max: Duration = 60.0
    max_age: Duration = 1500.0
    """25 minutes: within RabbitMQ's default 30-minute consumer timeout (see ``_check_retry_fits``)."""


class BatchConfig(_Section):
    """A target's ``batch:``: micro-batches for targets that accept arrays."""

    max_events: int = Field(100, ge=1, le=100_000)
    max_wait: Duration = 0.2


class BasicAuth(_Section):
    username: str
    password: str = Field(repr=False)


class AuthConfig(_Section):
    """``auth:``: a bearer token or basic credentials, from the environment; empty means none."""

    bearer: str | None = Field(None, repr=False)
    basic: BasicAuth | None = None

    @field_validator("bearer")
    @classmethod
    def _empty_is_none(cls, token: str | None) -> str | None:
        return token or None

    @model_validator(mode="after")
    def _one_scheme(self) -> AuthConfig:
        if self.bearer and self.basic:
            raise ValueError("auth has both bearer and basic; give one")
        return self

    def credentials(self) -> tuple[str | None, tuple[str, str] | None]:
        """(bearer token, (user, password)); either may be None."""
        basic = (self.basic.username, self.basic.password) if self.basic else None
        return self.bearer, basic


class XmlShape(_Section):
    root: str = "events"
    element: str = "event"


class CircuitBreakerConfig(_Section):
    """A target's ``circuit_breaker:``: pause after consecutive failures instead of hammering it."""

    failures: int = Field(5, ge=1)
    cooldown: Duration = 30.0


class SftpLogin(_Section):
    """How to reach an SFTP server: the host key pinned in ``known_hosts``, a key or password login."""

    host: str = Field(min_length=1)
    port: int = Field(22, ge=1, le=65535)
    username: str = Field(min_length=1)
    key_file: str | None = None
    key_passphrase: str | None = Field(None, repr=False)
    password: str | None = Field(None, repr=False)
    known_hosts: str

    @model_validator(mode="after")
    def _can_log_in(self) -> SftpLogin:
        if not self.key_file and not self.password:
            raise ValueError("give key_file or password (from the environment) to log in")
        return self

    @property
    def address(self) -> str:
        return f"sftp://{self.username}@{self.host}:{self.port}"


class _TargetBase(_Section):
    """What every target has: partitions, batching, retries, the payload's shape and format."""

    partitions: int = Field(8, ge=1, le=256)
    max_in_flight: int | None = Field(None, ge=1)
    batch: BatchConfig | None = None
    retry: RetryConfig = Field(default_factory=RetryConfig)
    timeout: Duration = Field(10.0, gt=0)
    accepts: list[Literal["delta", "absolute"]] | None = None
    body: dict[str, str] | None = None
    format: Literal["json", "xml", "csv"] = "json"
    xml: XmlShape | None = None
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)

    @property
    def in_flight_limit(self) -> int:
        """Requests in flight at once per process: ``max_in_flight``, by default one per partition."""
        return self.max_in_flight or self.partitions


class HttpTargetConfig(_TargetBase):
    """``type: http``: an ERP, WMS or OMS API."""

    type: Literal["http"]
    url: str
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    auth: AuthConfig | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.match(r"https?://[^/\s]+", url):
            raise ValueError("expected an http:// or https:// URL")
        return url

    @property
    def location(self) -> str:
        return redact_url(self.url)


class _FileNaming(_Section):
    """What the file and SFTP targets share: the ``filename`` pattern of the files they write."""

    filename: str = DEFAULT_FILENAME

    @field_validator("filename")
    @classmethod
    def _usable_pattern(cls, pattern: str) -> str:
        FilenamePattern(pattern)
        return pattern


class FileTargetConfig(_TargetBase, _FileNaming):
    """``type: file``: each request's payload written as one file in a local (or mounted) folder."""

    type: Literal["file"]
    path: str = Field(min_length=1)

    @property
    def location(self) -> str:
        return self.path


class SftpTargetConfig(_TargetBase, _FileNaming, SftpLogin):
    """``type: sftp``: each request's payload uploaded as one file to a folder on an SFTP server."""

    type: Literal["sftp"]
    remote_dir: str = Field(min_length=1)

    @property
    def location(self) -> str:
        return f"{self.address}{self.remote_dir}"


TargetConfig = Annotated[HttpTargetConfig | FileTargetConfig | SftpTargetConfig, Field(discriminator="type")]


class _DropSource(_Section):
    """What the file and SFTP sources share: which names to take, and when a file counts as complete."""

    pattern: str = "*"
    ready: Any = "stable"
    """``stable``, ``rename``, ``marker`` or ``{marker: "{name}.done"}`` (see connectors.file_ingest)."""

    @field_validator("pattern")
    @classmethod
    def _in_the_folder(cls, pattern: str) -> str:
        if not pattern or "/" in pattern or pattern in (".", ".."):
            raise ValueError(f"pattern {pattern!r} must match file names in the folder, without '/'")
        return pattern

    @field_validator("ready")
    @classmethod
    def _known_signal(cls, ready: Any) -> Any:
        Readiness.parse(ready)
        return ready

    @property
    def readiness(self) -> Readiness:
        return Readiness.parse(self.ready)


class FileSourceConfig(_DropSource):
    """``source: {type: file}``: a local drop folder (POS exports)."""

    type: Literal["file"]
    path: str = Field(min_length=1)
    stable_for: Duration = 1.0
    archive: str | None = None
    errors: str | None = None
    poll: Duration = 1.0


class SftpSourceConfig(SftpLogin, _DropSource):
    """``source: {type: sftp}``: a supplier's SFTP folder, host key pinned in ``known_hosts``."""

    type: Literal["sftp"]
    remote_dir: str = Field(min_length=1)
    archive: str | None = None
    delete: bool = False
    errors: str | None = None
    poll: Duration = Field(5.0, gt=0)
    stable_for: Duration = 2.0
    claim_ttl: Duration = Field(600.0, gt=0)
    """How long a claim on the server lives unless its router renews it (see connectors.sftp_source)."""

    @model_validator(mode="after")
    def _archive_or_delete(self) -> SftpSourceConfig:
        if bool(self.archive) == bool(self.delete):
            raise ValueError("give exactly one of archive: REMOTE_FOLDER or delete: true")
        inbox = posixpath.normpath(self.remote_dir)
        claims = posixpath.join(inbox, PROCESSING_DIR)
        for key, folder in (("archive", self.archive), ("errors", self.errors)):
            if folder and posixpath.normpath(folder) in (inbox, claims):
                raise ValueError(f"{key} ({folder}) must be a folder other than remote_dir ({inbox})")
        return self


class WebhookSourceConfig(_Section):
    """``source: {type: webhook}``: served at POST /webhooks/<route name>."""

    type: Literal["webhook"]
    secret: str | None = Field(None, repr=False)
    signature: Literal["standard", "hex", "sha256-prefixed"] = "standard"
    signature_header: str | None = None
    json_schema: str | None = Field(None, alias="schema")
    max_body: Size = 1024 * 1024
    rate_limit: Rate | None = None
    tolerance: Duration = 300.0


def _jmespath(expression: str | None) -> str | None:
    """Refuse an expression that does not compile as JMESPath."""
    if expression is not None:
        try:
            jmespath.compile(expression)
        except JMESPathError as error:
            reason = " ".join(str(error).split())
            raise ValueError(f"{expression!r} is not valid JMESPath: {reason}") from None
    return expression


JmesPath = Annotated[str, AfterValidator(_jmespath)]


class CursorConfig(_Section):
    param: str = Field(min_length=1)
    next: JmesPath


class RestSourceConfig(_Section):
    """``source: {type: rest}``: a polled REST API with cursor pagination."""

    type: Literal["rest"]
    url: str
    poll: Duration = Field(30.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)
    auth: AuthConfig | None = None
    cursor: CursorConfig | None = None
    id: JmesPath | None = None
    timeout: Duration = Field(30.0, gt=0)
    max_pages_per_poll: int = Field(1000, ge=1)
    max_page_bytes: Size = Field(32 * 1024 * 1024, ge=1)

    @field_validator("url")
    @classmethod
    def _polled_url(cls, url: str) -> str:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as error:
            raise ValueError(f"{redact(url)!r} is not a valid URL: {error}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"{parsed.copy_with(query=None)} must be http:// or https:// with a host")
        if parsed.userinfo:
            raise ValueError("the url must not carry credentials; give them under auth")
        return url


SourceConfig = Annotated[
    FileSourceConfig | SftpSourceConfig | WebhookSourceConfig | RestSourceConfig, Field(discriminator="type")
]


def _deliver_item(item: Any) -> Any:
    return {"target": item} if isinstance(item, str) else item


class DeliverTo(_Section):
    """An item of ``deliver:``: a target name, or ``{target, when}`` with a JMESPath condition (the
    pipeline's compiled form is :class:`router.pipeline.DeliveryRule`)."""

    target: str
    when: str | None = None


class CsvConfig(_Section):
    """A CSV route's ``csv:``: e.g. ``{delimiter: ";", encoding: cp1252}`` for many European POS exports.

    ``preamble``: lines of ``KEY;VALUE`` before the column header, read with ``from: document``;
    ``trailer``: the key of a last row ``KEY;COUNT`` whose count must match the rows read.
    """

    delimiter: str = ","
    encoding: str = "utf-8"
    preamble: int = Field(0, ge=0, le=1000)
    trailer: str | None = Field(None, min_length=1)


class FixedRecordType(_Section):
    """An item of ``fixed.record_types``: its role, its fields, and for a trailer its count field."""

    role: Literal["header", "detail", "trailer"] = "detail"
    fields: dict[str, tuple[int, int]] | list[dict[str, int]] = Field(default_factory=dict)
    count: str | None = None


class FixedConfig(_Section):
    """A fixed-width route's ``fixed:``: ``fields: {NAME: [start, width]}`` (1-based columns, or a
    copybook-like list ``[{NAME: width}, ...]``) for files of one record type, or ``type: [start,
    width]`` with ``record_types`` keyed by their code."""

    encoding: str = "utf-8"
    type: tuple[int, int] | None = None
    fields: dict[str, tuple[int, int]] | list[dict[str, int]] | None = None
    record_types: dict[str, FixedRecordType] | None = None

    def layout(self) -> dict[str, Any]:
        """The block as plain data for :func:`transforms.fixed_width.compile_layout`."""
        return self.model_dump(exclude_none=True)


class RouteConfig(_Section):
    """An item of ``routes:``: source, format, mapping into the canonical model, and targets."""

    name: str
    enabled: bool = True
    source: SourceConfig
    format: Literal["csv", "xml", "json", "jsonl", "fixed", "x12", "edifact"]
    records: str | None = None
    csv: CsvConfig | None = None
    fixed: FixedConfig | None = None
    map: dict[str, Any]
    filter: str | None = None
    sequence_key: list[str] = Field(default_factory=lambda: ["sku", "location"], min_length=1)
    deliver: list[DeliverTo] = Field(min_length=1)
    chunk_size: int = Field(500, ge=1, le=100_000)

    @field_validator("name")
    @classmethod
    def _url_and_queue_safe(cls, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"route name {name!r} must be lowercase letters, digits, '.', '_' or '-' "
                "(it is part of queue names and of /webhooks/<route>)"
            )
        return name

    @field_validator("deliver", mode="before")
    @classmethod
    def _names_are_rules(cls, items: Any) -> Any:
        return [_deliver_item(item) for item in items] if isinstance(items, list) else items

    def deliver_rules(self) -> list[DeliverTo]:
        return list(self.deliver)


class RouterConfig(_Section):
    """The whole routes.yaml."""

    version: Literal[1]
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    lookups: dict[str, LookupConfig] = Field(default_factory=dict)
    targets: dict[str, TargetConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=1)

    _path: Path = PrivateAttr(default=Path(DEFAULT_CONFIG))
    _lookup_tables: dict[str, Lookup] = PrivateAttr(default_factory=dict)

    @property
    def path(self) -> Path:
        """The file this configuration was loaded from."""
        return self._path

    @property
    def lookup_tables(self) -> dict[str, Lookup]:
        """The lookup tables, loaded once while the configuration was checked; routes share them."""
        return self._lookup_tables

    @property
    def base_dir(self) -> Path:
        """Relative paths in the configuration are relative to this folder."""
        return self._path.resolve().parent

    def resolve_path(self, value: str | Path) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    @property
    def enabled_routes(self) -> list[RouteConfig]:
        return [route for route in self.routes if route.enabled]

    def route(self, name: str) -> RouteConfig:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(
            f"no route named {name!r}; the configuration has: {', '.join(r.name for r in self.routes)}"
        )

    def summary(self) -> str:
        """One line saying what the configuration wires together (never any secret)."""
        routes = "; ".join(
            f"{route.name}: {route.source.type} -> {', '.join(rule.target for rule in route.deliver)}"
            for route in self.routes
        )
        return (
            f"{self._path}: ok: {len(self.routes)} route(s) ({routes}), {len(self.targets)} target(s), "
            f"broker {redact_urls(self.broker.url)}, store {redact_url(self.store.url)}"
        )


def redact_url(url: str) -> str:
    """A URL fit to print: its password masked."""
    return redact(url)


def find_config_path(explicit: str | None = None) -> Path:
    """``-c FILE``, else ``$ROUTER_CONFIG``, else ``./routes.yaml``."""
    return Path(explicit or os.environ.get("ROUTER_CONFIG") or DEFAULT_CONFIG)


def read_json_schema(path: Path) -> dict[str, Any]:
    """Load a webhook payload contract; raises ValueError saying why it cannot be used."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"JSON Schema file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"JSON Schema file {path} cannot be read: {error}") from None
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        raise ValueError(f"{path} is not a valid JSON Schema: {error.message}") from None
    return schema


def load_config(path: Path, env: Mapping[str, str] | None = None) -> RouterConfig:
    """Read, interpolate and validate ``path``; raises ConfigError listing every problem found."""
    document = read_document(path, os.environ if env is None else env)
    # Known before anything is checked, so no message from here on can print one of them.
    register_config_secrets(document.data)
    if document.data is None and not document.problems:
        document.problem((), "the configuration is empty; start from the routes.yaml in the repository")
    elif document.data is not None and not isinstance(document.data, dict):
        document.problem((), "the configuration must be a mapping with version, targets and routes")
    if document.problems:
        raise ConfigError(document.problems)
    _check_references(document)
    try:
        config = RouterConfig.model_validate(document.data)
    except ValidationError as error:
        for item in error.errors(include_url=False):
            _report_validation_error(document, item)
        raise ConfigError(document.problems) from None
    config._path = path
    _check_semantics(document, config)
    if document.problems:
        raise ConfigError(document.problems)
    return config


def _check_references(document: ConfigDocument) -> None:
    """Cross-references checked on the raw data, so they are reported beside any model error."""
    data = document.data
    targets = data.get("targets")
    target_names = list(targets) if isinstance(targets, dict) else []
    routes = data.get("routes")
    seen: dict[str, int] = {}
    for index, route in enumerate(routes if isinstance(routes, list) else []):
        if not isinstance(route, dict):
            continue
        name = route.get("name")
        if isinstance(name, str):
            if name in seen:
                document.problem(
                    ("routes", index, "name"),
                    f"route name {name!r} is used twice (first by routes[{seen[name]}])",
                )
            seen.setdefault(name, index)
        deliver = route.get("deliver")
        for position, item in enumerate(deliver if isinstance(deliver, list) else []):
            target = item.get("target") if isinstance(item, dict) else item
            if isinstance(target, str) and target not in target_names:
                document.problem(
                    ("routes", index, "deliver", position), _unknown("target", target, target_names)
                )


def _unknown(what: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"defined: {', '.join(known) or 'none'}"
    return f"unknown {what} {name!r}; {hint}"


def _data_path(data: Any, loc: tuple[str | int, ...]) -> ConfigPath:
    """The path in the document for a pydantic error location (union tags are not in the document)."""
    path: list[str | int] = []
    node = data
    for index, part in enumerate(loc):
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if in_list or (isinstance(node, dict) and part in node):
            node = node[part]
        elif index < len(loc) - 1:
            continue
        path.append(part)
    return tuple(path)


def _display(path: ConfigPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the configuration"


def _report_validation_error(document: ConfigDocument, item: Mapping[str, Any]) -> None:
    path = _data_path(document.data, tuple(item["loc"]))
    kind = item["type"]
    where = _display(path[:-1])
    if kind == "extra_forbidden":
        key = str(path[-1])
        allowed = _allowed_keys(tuple(item["loc"][:-1]))
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(allowed)}"
        document.problem(path, f"unknown key {key!r} in {where}; {hint}", at_key=True)
    elif kind == "missing":
        document.problem(path, f"missing required key {path[-1]!r} in {where}")
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = item.get("ctx", {}).get("expected_tags", "")
        document.problem(
            (*path, "type") if kind == "union_tag_invalid" else path,
            f"{_display(path)}.type must be one of {tags}",
        )
    else:
        message = str(item["msg"]).removeprefix("Value error, ")
        document.problem(path, f"{_display(path)}: {message}")


def _allowed_keys(loc: tuple[str | int, ...]) -> list[str]:
    """The keys the model at ``loc`` accepts, for a "did you mean" hint."""
    annotation: Any = RouterConfig
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    model = _unwrap(annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [field.alias or name for name, field in model.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated and Optional around a type."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _step(annotation: Any, part: str | int) -> Any:
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            if part in (name, field.alias):
                return field.annotation if field.annotation is not None else None
        return None
    if origin is list:
        return typing.get_args(annotation)[0]
    if origin is dict:
        return typing.get_args(annotation)[1]
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            fields = getattr(member, "model_fields", {})
            tag = fields.get("type")
            if tag is not None and part in typing.get_args(tag.annotation):
                return member
    return None


def _check_semantics(document: ConfigDocument, config: RouterConfig) -> None:
    """What the models cannot see: files load, expressions compile, targets accept what they get."""
    # Loaded once here and kept: the runtime maps with these very tables (a large item master is not
    # read twice at start).
    lookups = config._lookup_tables
    for name, table in config.lookups.items():
        try:
            lookups[name] = Lookup.from_csv(config.resolve_path(table.file), table.key, table.value, name)
        except LookupTableError as error:
            document.problem(("lookups", name, "file"), str(error))
    for index, route in enumerate(config.routes):
        at: ConfigPath = ("routes", index)
        _check_route(document, config, route, at, lookups)
    used = {rule.target for route in config.enabled_routes for rule in route.deliver}
    for name, target in config.targets.items():
        _check_retry_fits(document, config.broker, name, target)
        if target.max_in_flight is not None and target.max_in_flight > target.partitions:
            # A partition has one request in flight at a time, so a larger bound would promise nothing.
            document.problem(
                ("targets", name, "max_in_flight"),
                f"targets.{name}.max_in_flight {target.max_in_flight} exceeds partitions "
                f"{target.partitions}: each partition has at most one request in flight; lower "
                "max_in_flight or raise partitions",
            )
        if name in used and isinstance(target, SftpTargetConfig):
            _check_known_hosts(document, config, target, ("targets", name, "known_hosts"))
    if config.console.trusted_header and not config.http.console_listen:
        document.problem(
            ("console", "trusted_header"),
            "a trusted proxy header needs http.console_listen: on the partners' listener anyone could send "
            "it; serve the console on its own address that only the proxy reaches",
        )
    if config.console.enabled and config.http.workers > 1 and not config.console.session_secret:
        document.problem(
            ("http", "workers"),
            f"http.workers {config.http.workers} with the console needs console.session_secret: each "
            "worker process would otherwise sign sign-ins and forms with a key of its own and refuse the "
            "others'; set console.session_secret from the environment",
        )


def _check_route(
    document: ConfigDocument,
    config: RouterConfig,
    route: RouteConfig,
    at: ConfigPath,
    lookups: dict[str, Lookup],
) -> None:
    try:
        check_records_path(route.format, route.records)
    except ValueError as error:
        document.problem((*at, "records"), str(error))
    if route.format in EDI_FORMATS and not isinstance(route.source, FileSourceConfig | SftpSourceConfig):
        document.problem(
            (*at, "format"),
            f"format: {route.format} is read from files (file, sftp), not a {route.source.type} source",
        )
    if route.csv is not None:
        if route.format != "csv":
            document.problem((*at, "csv"), f"csv: applies to format: csv, not format: {route.format}")
        else:
            try:
                csv = route.csv
                iter_records(
                    io.BytesIO(b""),
                    "csv",
                    route.records,
                    route.name,
                    csv_delimiter=csv.delimiter,
                    encoding=csv.encoding,
                )
            except ValueError as error:
                document.problem((*at, "csv"), str(error))
    _check_fixed(document, route, at)
    _check_event_fields(document, route, at)
    known_lookups = {name: lookups.get(name) or Lookup(name, {}) for name in config.lookups}
    try:
        compile_mapping(route.map, route.format, known_lookups, no_document=_no_document(route))
    except ValueError as error:
        field = _FIELD_IN_MESSAGE.search(str(error))
        where: ConfigPath = (*at, "map", *field.group(1).split(".")) if field else (*at, "map")
        document.problem(where, str(error))
    for key, expression in (("filter", route.filter),):
        if expression is not None:
            _check_condition(document, (*at, key), expression)
    for position, rule in enumerate(route.deliver):
        if rule.when is not None:
            _check_condition(document, (*at, "deliver", position, "when"), rule.when)
        target = config.targets.get(rule.target)
        if target is not None and target.accepts is not None:
            _check_accepts(document, route, rule.target, target.accepts, (*at, "deliver", position))
    source = route.source
    if not route.enabled:
        return  # a disabled route's files and secrets may not exist on this machine
    if isinstance(source, WebhookSourceConfig) and not source.secret:
        document.problem(
            (*at, "source", "secret"), "a webhook route needs a secret (whsec_<base64>), from the environment"
        )
    elif isinstance(source, WebhookSourceConfig) and source.secret:
        try:
            secret_key(source.secret)
        except ValueError as error:
            document.problem((*at, "source", "secret"), str(error))
    if isinstance(source, WebhookSourceConfig) and source.json_schema is not None:
        try:
            read_json_schema(config.resolve_path(source.json_schema))
        except ValueError as error:
            document.problem((*at, "source", "schema"), str(error))
    if isinstance(source, SftpSourceConfig):
        _check_known_hosts(document, config, source, (*at, "source", "known_hosts"))


def _check_retry_fits(document: ConfigDocument, broker: BrokerConfig, name: str, target: _TargetBase) -> None:
    """A target's retries in place must end before RabbitMQ's consumer timeout closes the channel of the
    message being retried (another process would then start on the same key)."""
    budget = retry_budget(broker.consumer_timeout, target.timeout)
    timeout, consumer_timeout = _duration(target.timeout), _duration(broker.consumer_timeout)
    if budget <= 0:
        document.problem(
            ("targets", name, "timeout"),
            f"targets.{name}.timeout {timeout} leaves no time to retry within broker.consumer_timeout "
            f"{consumer_timeout}; lower the timeout or raise the broker's consumer_timeout (rabbitmq.conf) "
            "and broker.consumer_timeout with it",
        )
    elif target.retry.max_age > budget:
        document.problem(
            ("targets", name, "retry", "max_age"),
            f"targets.{name}.retry.max_age {_duration(target.retry.max_age)} outlives "
            f"broker.consumer_timeout {consumer_timeout}: RabbitMQ would close the channel of a message "
            f"still retrying and another process would start on its key; set max_age to at most "
            f"{_duration(_whole_minutes(budget))} (consumer_timeout less twice the timeout {timeout} and a "
            "twentieth), or raise the broker's consumer_timeout (rabbitmq.conf) and broker.consumer_timeout",
        )


def _duration(seconds: float) -> str:
    """Seconds as routes.yaml writes a duration: ``1h``, ``25m``, ``90s``, ``1.5s``."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _whole_minutes(seconds: float) -> float:
    """``seconds`` rounded down to whole minutes (whole seconds when under a minute)."""
    return 60 * math.floor(seconds / 60) if seconds >= 60 else math.floor(seconds)


def _no_document(route: RouteConfig) -> str | None:
    """Why the route's records have no document around them for ``from: document``, or None."""
    if route.format == "csv" and (route.csv is None or not route.csv.preamble):
        return "a csv route's document is its csv.preamble, and it has none"
    if route.format == "fixed" and route.fixed is not None:
        types = (route.fixed.record_types or {}).values()
        if not any(kind.role == "header" for kind in types):
            return "a fixed route's document is its header record, and its layout has no role: header"
    if isinstance(route.source, WebhookSourceConfig) and route.records is None:
        return "without records, a webhook's payload is the record itself"
    if isinstance(route.source, RestSourceConfig):
        return "a REST page is not kept with its records; read the record itself"
    if route.format in EDI_FORMATS:
        return "an EDI record carries its header in itself: read header.*, envelope.* or its loops"
    if route.format == "json" and route.records in (None, "@", "[*]", "@[*]"):
        return "without a records path below the top level, a json file's records are the whole document"
    return None


def _check_fixed(document: ConfigDocument, route: RouteConfig, at: ConfigPath) -> None:
    if route.fixed is None:
        if route.format == "fixed":
            document.problem((*at, "format"), "format: fixed needs a fixed: block (fields or record_types)")
        return
    if route.format != "fixed":
        document.problem((*at, "fixed"), f"fixed: applies to format: fixed, not format: {route.format}")
        return
    try:
        compile_layout(route.fixed.layout())
    except LayoutError as error:
        document.problem((*at, "fixed", *error.where), error.reason)


def _check_known_hosts(
    document: ConfigDocument, config: RouterConfig, connection: SftpLogin, path: ConfigPath
) -> None:
    known_hosts = config.resolve_path(connection.known_hosts)
    if not known_hosts.is_file():
        document.problem(
            path, f"known_hosts file {known_hosts} not found; the SFTP server's host key must be pinned"
        )


def _check_event_fields(document: ConfigDocument, route: RouteConfig, at: ConfigPath) -> None:
    """A mapped field or sequence key the canonical model does not have would dead-letter every record."""
    event_type = route.map.get("type")
    if isinstance(event_type, str) and event_type not in EVENT_MODELS:
        document.problem((*at, "map", "type"), _unknown("event type", event_type, list(EVENT_TYPES)))
        return
    models = [EVENT_MODELS[event_type]] if isinstance(event_type, str) else list(EVENT_MODELS.values())
    fields = sorted({name for model in models for name in model.model_fields} - SET_BY_ROUTER)
    described = f"{event_type} events" if isinstance(event_type, str) else "canonical events"
    for name in route.map:
        if name not in fields:
            document.problem(
                (*at, "map", name), f"{_unknown('field', name, fields)} ({described})", at_key=True
            )
    for position, name in enumerate(route.sequence_key):
        if name not in fields:
            document.problem(
                (*at, "sequence_key", position), f"sequence_key {_unknown('field', name, fields)}"
            )


def _check_condition(document: ConfigDocument, path: ConfigPath, expression: str) -> None:
    try:
        EventPredicate(expression)
    except ValueError as error:
        document.problem(path, str(error))


def _check_accepts(
    document: ConfigDocument, route: RouteConfig, target: str, accepts: list[str], path: ConfigPath
) -> None:
    event_type = route.map.get("type")
    if not isinstance(event_type, str):
        return  # the type is mapped per record, so it is not known before records arrive
    semantics = route.map.get("quantity_semantics")
    if not isinstance(semantics, str) and event_type in EVENT_MODELS:
        semantics = EVENT_MODELS[event_type].model_fields["quantity_semantics"].default
    if semantics not in accepts:
        document.problem(
            path,
            f"target {target!r} accepts only {' and '.join(accepts)} quantities, but route {route.name!r} "
            f"produces {event_type} events ({semantics})",
        )
