"""`router run`: starts the sources, transform and delivery workers and the HTTP listener, and drains them.

Each part runs in its own thread with its own broker connection. Stopping (SIGTERM, SIGINT or
:meth:`RouterRuntime.stop`) sets one event that every loop watches: sources finish the file in hand,
workers finish or give back the message in hand, retry waits are cut short and their message returns
to the queue unacknowledged. Nothing is lost or half-applied.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Protocol

from starlette.applications import Starlette

from connectors.chunks import ChunkSink
from connectors.file_ingest import printable, refusal_of
from connectors.file_source import FileDropSettings, FileDropSource
from connectors.rest_source import RestPollSource
from connectors.sftp_source import SftpSettings, SftpSource
from connectors.webhooks.intake import WebhookIntake
from connectors.webhooks.routes import webhook_routes
from deadletter import NewDeadLetter
from ops import metrics
from ops.health import ops_routes
from router import assembly
from router.broker import Topology, connect, queue_depth
from router.config import RouteConfig, RouterConfig
from router.console.app import ELSEWHERE, NOT_CONFIGURED, Console, closed_console_routes
from router.delivery_worker import DeliveryWorker
from router.http_server import HttpListener
from router.http_workers import HttpWorkers, worker_port
from router.ingress import IngressGroupPublisher, IngressPublisher
from router.transform_worker import TransformWorker
from state import Store
from transforms.parsers import FileFormatError

log = logging.getLogger(__name__)

STAGES = ("sources", "transform", "delivery", "http")
QUEUE_DEPTH_INTERVAL = 15.0
"""Seconds between samples of router_queue_depth (a passive declare per queue)."""


class PollingSource(Protocol):
    """A source that runs in its own thread until stopped (file drop, SFTP, REST)."""

    def run(self, stop: threading.Event) -> None: ...

    def close(self) -> None: ...


@dataclass
class RouterRuntime:
    """The running router for one configuration; ``only`` limits it to some stages (several processes)."""

    config: RouterConfig
    only: Collection[str] = STAGES
    route: str | None = None
    store: Store | None = None
    http_port: int | None = None
    http_worker_command: Sequence[str] | None = None
    """The command of one more HTTP process (`router run --only http`), for ``http.workers`` > 1."""
    stop_event: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _listener: HttpListener | None = None
    _console_listener: HttpListener | None = None
    _http_workers: HttpWorkers | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = set(self.only) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; expected some of {', '.join(STAGES)}")
        if self.route is not None and self.route not in {r.name for r in self.config.enabled_routes}:
            names = ", ".join(r.name for r in self.config.enabled_routes)
            raise ValueError(f"no enabled route named {self.route!r}; the configuration enables: {names}")
        if self.store is None:
            self.store = Store(self.config.store.resolved_url(self.config.base_dir))
            self._closers.append(self.store.close)
        self.broker = assembly.broker_settings(self.config)
        self.topology = Topology(self.broker)

    @property
    def routes(self) -> list[RouteConfig]:
        """The enabled routes this process serves (one, with ``--route``)."""
        return [r for r in self.config.enabled_routes if self.route is None or r.name == self.route]

    def start(self) -> None:
        """Declare the topology, then start every selected stage."""
        with connect(self.broker) as connection:
            queues = [self.topology.ingress_queue(r.name) for r in self.config.enabled_routes]
            for name, target in self.config.targets.items():
                queues.extend(self.topology.delivery_queues(name, target.partitions))
            self.topology.declare(connection, queues)
        if "delivery" in self.only:
            self._start_delivery()
        if "transform" in self.only:
            lookups = self.config.lookup_tables
            pipelines = assembly.build_pipelines(self.config, self.routes)
            worker = TransformWorker(
                self.broker,
                pipelines,
                self._store,
                self.stop_event,
                prefetch=self.config.broker.prefetch,
                lookups=list(lookups.values()),
                lookup_refresh=min((t.refresh for t in self.config.lookups.values()), default=10.0),
            )
            self._spawn("transform", worker.run)
        if "http" in self.only and self.config.http.enabled:
            self._start_http()
        if "sources" in self.only:
            self._start_sources()
        stages = ",".join(s for s in STAGES if s in self.only)
        log.info("router running: stages %s, %d route(s)", stages, len(self.routes))

    @property
    def _store(self) -> Store:
        assert self.store is not None
        return self.store

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _start_delivery(self) -> None:
        targets = {rule.target for route in self.routes for rule in route.deliver_rules()}
        for name in sorted(targets):
            target = self.config.targets[name]
            client = assembly.delivery_target(self.config, name, target)
            self._closers.append(client.close)
            worker = DeliveryWorker(
                self.broker,
                assembly.delivery_settings(name, target, self.config.journal.retention),
                client,
                assembly.payload_renderer(target),
                self._store,
                self.stop_event,
            )
            self._spawn(f"deliver-{name}", worker.run)

    def _start_sources(self) -> None:
        for route in self.routes:
            if route.source.type == "webhook":
                continue  # partners push: served by the HTTP listener
            factory = self._source_factory(route)
            self._spawn(f"source-{route.name}", functools.partial(self._run_source, factory))

    def _source_factory(self, route: RouteConfig) -> Callable[[ChunkSink], PollingSource]:
        """How to build a route's source around the confirmed-publish sink of its own thread."""
        if route.source.type == "rest":
            rest = assembly.rest_poll_settings(route)
            return lambda sink: RestPollSource(rest, sink, self._store)
        if route.source.type == "sftp":
            sftp = assembly.sftp_settings(self.config, route)

            def sftp_rejected(settings: SftpSettings, moved: str, error: FileFormatError) -> None:
                self._file_rejected(settings.route, f"sftp://{settings.address}{moved}", error)

            return lambda sink: SftpSource(sftp, sink, on_rejected=sftp_rejected)
        drop = assembly.file_drop_settings(self.config, route)

        def drop_rejected(settings: FileDropSettings, moved: Path, error: FileFormatError) -> None:
            self._file_rejected(settings.route, str(moved), error)

        return lambda sink: FileDropSource(drop, sink, on_rejected=drop_rejected)

    def _run_source(self, factory: Callable[[ChunkSink], PollingSource]) -> None:
        sink = IngressPublisher(self.broker, self.topology)
        source = factory(sink)
        try:
            source.run(self.stop_event)
        finally:
            source.close()
            sink.close()

    def _file_rejected(self, route: str, location: str, error: FileFormatError) -> None:
        """A whole file was refused: it sits in the errors folder; the dead letter says where and why."""
        reason = refusal_of(error).value
        self._store.add_dead_letters(
            [
                NewDeadLetter(
                    route=route,
                    stage="ingress",
                    reason=reason,
                    detail=str(error),
                    payload={"file": printable(location)},
                    source_ref={"file": error.name, "line": error.line},
                )
            ]
        )
        metrics.DEADLETTERS.labels(route=route, stage="ingress", reason=reason).inc()

    def _start_http(self) -> None:
        routes = ops_routes({"broker": self._check_broker, "store": self._store.ping})
        store = self._store
        metrics.STATE_GAUGES.attach(store, [route.name for route in self.routes], list(self.config.targets))
        self._closers.append(lambda: metrics.STATE_GAUGES.detach(store))
        receivers = {
            route.name: assembly.webhook_settings(self.config, route)
            for route in self.routes
            if route.source.type == "webhook"
        }
        if receivers:
            publisher = IngressGroupPublisher(self.broker)
            intake = WebhookIntake(publisher, self._store)
            # Closers run last to first: the intake answers the requests in hand before the publisher goes.
            self._closers += [publisher.close, intake.close]
            routes += webhook_routes(receivers, intake)
        console = self.config.http.console_address
        if not self.config.console.enabled:
            routes += closed_console_routes(NOT_CONFIGURED)
        elif console is None:
            routes += Console(self.config, self._store).routes()
        else:
            routes += closed_console_routes(ELSEWHERE)
            app = Starlette(routes=Console(self.config, self._store).routes())
            self._console_listener = HttpListener(app, *console, self.config.http)
            self._console_listener.start()
            log.info("console listener on %s:%d", console[0], self._console_listener.port)
        app = Starlette(routes=routes)
        port = self.config.http.port if self.http_port is None else self.http_port
        shared = worker_port()
        self._listener = HttpListener(app, self.config.http.host, shared or port, self.config.http)
        self._listener.start()
        log.info("HTTP listener on %s:%d", self.config.http.host, self._listener.port)
        if self.config.http.workers > 1 and shared is None and self.http_worker_command:
            self._http_workers = HttpWorkers(
                self.http_worker_command, self.config.http.workers - 1, self._listener.port
            )
            self._http_workers.start()
        if not self.broker.is_memory:
            self._spawn("queue-depths", self._sample_queue_depths)

    def _sample_queue_depths(self) -> None:
        """Keep router_queue_depth current for /metrics: every route's ingress and target partition queue."""
        queues = [self.topology.ingress_queue(route.name) for route in self.config.enabled_routes]
        for name, target in self.config.targets.items():
            queues.extend(self.topology.delivery_queues(name, target.partitions))
        while not self.stop_event.is_set():
            try:
                with connect(self.broker) as connection:
                    for queue in queues:
                        depth = queue_depth(connection, queue)
                        if depth is not None:
                            metrics.QUEUE_DEPTH.labels(queue=queue.name).set(depth)
            except Exception as error:  # the broker being away is reported by /readyz; try again later
                log.debug("queue depths not sampled: %s", error)
            self.stop_event.wait(QUEUE_DEPTH_INTERVAL)

    def _check_broker(self) -> None:
        with connect(self.broker) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)

    @property
    def listener(self) -> HttpListener | None:
        return self._listener

    @property
    def console_listener(self) -> HttpListener | None:
        """The console's own listener when ``http.console_listen`` is set."""
        return self._console_listener

    def stop(self, timeout: float = 30.0) -> None:
        """Drain: signal every stage, wait for them to finish the work in hand, release resources."""
        self.stop_event.set()
        if self._http_workers is not None:
            self._http_workers.stop(timeout)
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                log.error("stage %s did not drain within %.0fs", thread.name, timeout)
        for listener in (self._listener, self._console_listener):
            if listener is not None:
                listener.stop()
        for close in reversed(self._closers):
            close()

    def run_until_signalled(self) -> None:
        """Start, then block until SIGTERM or SIGINT, then drain."""

        def request_stop(signum: int, _: FrameType | None) -> None:
            log.info("received %s; draining", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        self.start()
        while not self.stop_event.wait(0.5):
            if self._http_workers is not None:
                self._http_workers.supervise()
            if not any(thread.is_alive() for thread in self._threads) and self._listener is None:
                log.error("every stage stopped; exiting")
                break
        self.stop()
