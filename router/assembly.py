"""Builds the runtime parts (pipelines, sources, targets) from a validated configuration."""

from __future__ import annotations

from collections.abc import Iterable

from connectors.circuit import CircuitSettings
from connectors.delivery import DeliveryTarget
from connectors.file_ingest import FileParsing
from connectors.file_source import FileDropSettings
from connectors.file_target import FileTarget, FileTargetSettings
from connectors.http_target import HttpTarget, HttpTargetSettings
from connectors.rest_settings import RestPollSettings
from connectors.retry import RetryPolicy
from connectors.sftp_session import SftpEndpoint
from connectors.sftp_source import SftpSettings
from connectors.sftp_target import SftpTarget, SftpTargetSettings
from connectors.webhooks.settings import WebhookSettings
from ops import metrics
from router.broker import BrokerSettings
from router.config import (
    DeliverTo,
    FileSourceConfig,
    FileTargetConfig,
    RestSourceConfig,
    RouteConfig,
    RouterConfig,
    SftpLogin,
    SftpSourceConfig,
    SftpTargetConfig,
    TargetConfig,
    WebhookSourceConfig,
    read_json_schema,
)
from router.delivery_worker import DeliverySettings
from router.pipeline import DeliveryRule, RoutePipeline
from transforms.filters import EventPredicate
from transforms.fixed_width import FixedLayout, compile_layout
from transforms.mapping import compile_mapping
from transforms.parsers import CsvDialect
from transforms.render import PayloadRenderer


def broker_settings(config: RouterConfig) -> BrokerSettings:
    broker = config.broker
    return BrokerSettings(
        url=";".join(broker.url),
        queue_type=broker.queue_type,
        prefix=broker.prefix,
        confirm_timeout=broker.confirm_timeout,
        consumer_timeout=broker.consumer_timeout,
    )


def _delivery_rule(config: RouterConfig, rule: DeliverTo) -> DeliveryRule:
    target = config.targets[rule.target]
    return DeliveryRule(
        target=rule.target,
        partitions=target.partitions,
        when=EventPredicate(rule.when) if rule.when else None,
        accepts=frozenset(target.accepts) if target.accepts else None,
    )


def build_pipelines(config: RouterConfig, routes: Iterable[RouteConfig]) -> dict[str, RoutePipeline]:
    """Compile the transform of each route: mapping, filter, sequence key, delivery rules."""
    lookups = config.lookup_tables
    pipelines: dict[str, RoutePipeline] = {}
    for route in routes:
        rules = [_delivery_rule(config, rule) for rule in route.deliver_rules()]
        pipelines[route.name] = RoutePipeline(
            route=route.name,
            mapping=compile_mapping(route.map, route.format, lookups),
            sequence_fields=list(route.sequence_key),
            rules=rules,
            filter=EventPredicate(route.filter) if route.filter else None,
        )
    return pipelines


def csv_dialect(route: RouteConfig) -> CsvDialect:
    """A route's CSV delimiter, encoding, preamble and trailer (the defaults when it has no ``csv:``)."""
    if route.csv is None:
        return CsvDialect()
    csv = route.csv
    return CsvDialect(csv.delimiter, csv.encoding, csv.preamble, csv.trailer)


def fixed_layout(route: RouteConfig) -> FixedLayout | None:
    """A fixed-width route's compiled layout (`router validate` has checked it), else None."""
    return compile_layout(route.fixed.layout()) if route.fixed is not None else None


def file_parsing(route: RouteConfig) -> FileParsing:
    """How a file or SFTP route's files are read: format, record path, chunk size, CSV dialect, layout."""
    return FileParsing(
        route.name, route.source.type, route.format, route.records, route.chunk_size, csv_dialect(route),
        fixed_layout(route),
    )


def file_drop_settings(config: RouterConfig, route: RouteConfig) -> FileDropSettings:
    """Resolve a file route's folders against the config file's folder."""
    source = route.source
    assert isinstance(source, FileSourceConfig)
    inbox = config.resolve_path(source.path)
    return FileDropSettings(
        route=route.name,
        inbox=inbox,
        archive=config.resolve_path(source.archive) if source.archive else inbox.parent / "archive",
        errors=config.resolve_path(source.errors) if source.errors else inbox.parent / "errors",
        parsing=file_parsing(route),
        pattern=source.pattern,
        stable_for=source.stable_for,
        poll=source.poll,
        ready=source.readiness,
    )


def delivery_target(config: RouterConfig, name: str, target: TargetConfig) -> DeliveryTarget:
    """The client that sends a target its payloads (HTTP, a local folder or SFTP), with its retry policy."""
    retry = RetryPolicy(
        attempts=target.retry.attempts,
        initial=target.retry.initial,
        max_delay=target.retry.max,
        max_age=target.retry.max_age,
    )
    breaker = target.circuit_breaker
    circuit = CircuitSettings(failures=breaker.failures, cooldown=breaker.cooldown)

    def count_attempt(outcome: str, _: float) -> None:
        metrics.DELIVERY_ATTEMPTS.labels(target=name, outcome=outcome).inc()

    if isinstance(target, FileTargetConfig):
        folder = config.resolve_path(target.path)
        file_settings = FileTargetSettings(name, folder, target.filename, retry=retry, circuit=circuit)
        return FileTarget(file_settings, on_attempt=count_attempt)
    if isinstance(target, SftpTargetConfig):
        endpoint = sftp_endpoint(config, target, connect_timeout=target.timeout, io_timeout=target.timeout)
        sftp_settings = SftpTargetSettings(
            name, endpoint, target.remote_dir, target.filename, retry=retry, circuit=circuit
        )
        return SftpTarget(sftp_settings, on_attempt=count_attempt)
    bearer, basic = target.auth.credentials() if target.auth else (None, None)
    http_settings = HttpTargetSettings(
        name=name,
        url=target.url,
        method=target.method,
        headers=dict(target.headers),
        bearer=bearer,
        basic=basic,
        timeout=target.timeout,
        retry=retry,
        batch_max_events=target.batch.max_events if target.batch else None,
        circuit=circuit,
        connections=target.in_flight_limit,
    )
    return HttpTarget(http_settings, on_attempt=count_attempt)


def payload_renderer(target: TargetConfig) -> PayloadRenderer:
    xml = target.xml
    return PayloadRenderer(
        body=target.body,
        fmt=target.format,
        xml_root=xml.root if xml else "events",
        xml_element=xml.element if xml else "event",
    )


def delivery_settings(name: str, target: TargetConfig, journal_retention: float) -> DeliverySettings:
    return DeliverySettings(
        target=name,
        partitions=target.partitions,
        max_in_flight=target.in_flight_limit,
        batch_max_events=target.batch.max_events if target.batch else None,
        batch_max_wait=target.batch.max_wait if target.batch else 0.0,
        journal_retention=journal_retention,
    )


def webhook_settings(config: RouterConfig, route: RouteConfig) -> WebhookSettings:
    """A webhook route's receiver settings, with its payload contract loaded."""
    source = route.source
    assert isinstance(source, WebhookSourceConfig)
    schema = read_json_schema(config.resolve_path(source.json_schema)) if source.json_schema else None
    return WebhookSettings(
        route=route.name,
        secret=source.secret,
        schema=schema,
        max_body=source.max_body,
        rate_limit=source.rate_limit,
        tolerance=source.tolerance,
        records=route.records,
        signature=source.signature,
        signature_header=source.signature_header,
        body_timeout=config.http.body_timeout,
        signature_failures=config.http.signature_failures,
    )


def rest_poll_settings(route: RouteConfig) -> RestPollSettings:
    """A REST route's polling settings."""
    source = route.source
    assert isinstance(source, RestSourceConfig)
    bearer, basic = source.auth.credentials() if source.auth else (None, None)
    return RestPollSettings(
        route=route.name,
        url=source.url,
        records=route.records,
        chunk_size=route.chunk_size,
        poll=source.poll,
        headers=dict(source.headers),
        bearer=bearer,
        basic=basic,
        cursor_param=source.cursor.param if source.cursor else None,
        cursor_next=source.cursor.next if source.cursor else None,
        record_id=source.id,
        timeout=source.timeout,
        max_pages_per_poll=source.max_pages_per_poll,
        max_page_bytes=source.max_page_bytes,
    )


def sftp_endpoint(config: RouterConfig, login: SftpLogin, **timeouts: float) -> SftpEndpoint:
    """The one runtime copy of an SFTP login: key and known_hosts files resolved against the config folder."""
    return SftpEndpoint(
        host=login.host,
        port=login.port,
        username=login.username,
        known_hosts=config.resolve_path(login.known_hosts),
        password=login.password,
        key_file=config.resolve_path(login.key_file) if login.key_file else None,
        key_passphrase=login.key_passphrase,
        **timeouts,
    )


def sftp_settings(config: RouterConfig, route: RouteConfig) -> SftpSettings:
    """An SFTP route's source settings (the endpoint keeps its default connect and I/O timeouts)."""
    source = route.source
    assert isinstance(source, SftpSourceConfig)
    return SftpSettings(
        route=route.name,
        endpoint=sftp_endpoint(config, source),
        remote_dir=source.remote_dir,
        parsing=file_parsing(route),
        pattern=source.pattern,
        archive=source.archive,
        delete=source.delete,
        errors=source.errors,
        poll=source.poll,
        stable_for=source.stable_for,
        claim_ttl=source.claim_ttl,
        reconnect_max=source.reconnect_max,
        ready=source.readiness,
    )
