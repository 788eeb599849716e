"""What the models cannot see: files load, expressions compile, targets accept what they get."""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from canonical.events import EVENT_MODELS, EVENT_TYPES
from connectors.signatures import secret_key
from router.broker import retry_budget
from router.config.common import SftpLogin
from router.config.model import RouteConfig, RouterConfig
from router.config.problems import unknown
from router.config.sections import BrokerConfig
from router.config.sources import FileSourceConfig, RestSourceConfig, SftpSourceConfig, WebhookSourceConfig
from router.config.targets import SftpTargetConfig, TargetBase
from router.config_source import ConfigDocument, ConfigPath
from transforms.edi import EDI_FORMATS
from transforms.filters import EventPredicate
from transforms.fixed_width import LayoutError, compile_layout
from transforms.lookups import Lookup, LookupTableError
from transforms.mapping import compile_mapping
from transforms.parsers import check_records_path, iter_records

_FIELD_IN_MESSAGE = re.compile(r"field '([^']+)'")
SET_BY_ROUTER = frozenset({"event_id", "source", "recorded_at", "sequence_key"})
"""Canonical fields the transform stage fills in itself; a route's map cannot set them."""


def check_semantics(document: ConfigDocument, config: RouterConfig) -> None:
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


def _check_retry_fits(document: ConfigDocument, broker: BrokerConfig, name: str, target: TargetBase) -> None:
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
        document.problem((*at, "map", "type"), unknown("event type", event_type, list(EVENT_TYPES)))
        return
    models = [EVENT_MODELS[event_type]] if isinstance(event_type, str) else list(EVENT_MODELS.values())
    fields = sorted({name for model in models for name in model.model_fields} - SET_BY_ROUTER)
    described = f"{event_type} events" if isinstance(event_type, str) else "canonical events"
    for name in route.map:
        if name not in fields:
            document.problem(
                (*at, "map", name), f"{unknown('field', name, fields)} ({described})", at_key=True
            )
    for position, name in enumerate(route.sequence_key):
        if name not in fields:
            document.problem(
                (*at, "sequence_key", position), f"sequence_key {unknown('field', name, fields)}"
            )


def _check_condition(document: ConfigDocument, path: ConfigPath, expression: str) -> None:
    try:
        EventPredicate(expression)
    except ValueError as error:
        document.problem(path, str(error))


def _check_accepts(
    document: ConfigDocument, route: RouteConfig, target: str, accepts: Sequence[str], path: ConfigPath
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


def read_json_schema(path: Path) -> dict[str, Any]:
    """Load a webhook payload contract; raises ValueError saying why it cannot be used."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"JSON Schema file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"JSON Schema file {path} cannot be read: {error}") from None
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        raise ValueError(f"{path} is not a valid JSON Schema: {error.message}") from None
    return schema
