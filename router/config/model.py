"""A route (``routes:`` items) and the whole routes.yaml (:class:`RouterConfig`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator

from router.broker import redact_urls
from router.config.common import NAME, Section, redact_url
from router.config.sections import (
    BrokerConfig,
    ConsoleConfig,
    HttpConfig,
    JournalConfig,
    LookupConfig,
    StoreConfig,
)
from router.config.sources import SourceConfig
from router.config.targets import TargetConfig
from transforms.lookups import Lookup

DEFAULT_CONFIG = "routes.yaml"


def _deliver_item(item: Any) -> Any:
    return {"target": item} if isinstance(item, str) else item


class DeliverTo(Section):
    """An item of ``deliver:``: a target name, or ``{target, when}`` with a JMESPath condition (the
    pipeline's compiled form is :class:`router.pipeline.DeliveryRule`)."""

    target: str
    when: str | None = None


class CsvConfig(Section):
    """A CSV route's ``csv:``: e.g. ``{delimiter: ";", encoding: cp1252}`` for many European POS exports.

    ``preamble``: lines of ``KEY;VALUE`` before the column header, read with ``from: document``;
    ``trailer``: the key of a last row ``KEY;COUNT`` whose count must match the rows read.
    """

    delimiter: str = ","
    encoding: str = "utf-8"
    preamble: int = Field(0, ge=0, le=1000)
    trailer: str | None = Field(None, min_length=1)


class FixedRecordType(Section):
    """An item of ``fixed.record_types``: its role, its fields, and for a trailer its count field."""

    role: Literal["header", "detail", "trailer"] = "detail"
    fields: dict[str, tuple[int, int]] | list[dict[str, int]] = Field(default_factory=dict)
    count: str | None = None


class FixedConfig(Section):
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


class RouteConfig(Section):
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
        if not NAME.fullmatch(name):
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


class RouterConfig(Section):
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


def find_config_path(explicit: str | None = None) -> Path:
    """``-c FILE``, else ``$ROUTER_CONFIG``, else ``./routes.yaml``."""
    return Path(explicit or os.environ.get("ROUTER_CONFIG") or DEFAULT_CONFIG)
