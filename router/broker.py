"""Broker topology and confirmed publishing over kombu (RabbitMQ in production, memory:// embedded).

Every stage talks to the broker through this module so that queue names, queue arguments and
publishing guarantees are defined once:

- one durable ingress queue per route: ``<prefix>.ingress.<route>``, single-active-consumer;
- per-target partition queues ``<prefix>.deliver.<target>.<n>``, each with single-active-consumer on
  RabbitMQ so that exactly one consumer at a time sees a partition, which keeps order per sequence key;
- on RabbitMQ every queue carries ``x-consumer-timeout`` (``broker.consumer_timeout``), the time the
  delivery worker keeps each message's retries within (see :func:`retry_budget`);
- one direct exchange ``<prefix>`` routing by queue name;
- persistent messages published with publisher confirms: ``publish`` returns only once RabbitMQ has
  taken responsibility for the message, which is what lets a source acknowledge upstream.

``broker.url`` may name every node of a RabbitMQ cluster (``;``-separated here): a connection tries
them in turn (round-robin) when it connects or reconnects, and a publish whose connection fails, or
whose confirm does not come, is published again through the next node. A message may then be taken
twice; event ids make the copy harmless downstream, while a message never confirmed is never dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kombu import Connection, Exchange, Producer, Queue

from ops import tracing
from ops.secrets import redact
from router.messages import WireMessage, encode_body

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"


DEFAULT_CONSUMER_TIMEOUT = 1800.0
"""RabbitMQ's default ``consumer_timeout``: how long it lets a delivery go unacknowledged (seconds)."""


def retry_budget(consumer_timeout: float, attempt_timeout: float) -> float:
    """Seconds a partition message may be held while its events are retried in place: the broker's
    consumer timeout less two attempt timeouts (the attempt in flight when time runs out, with its slow
    phases) and a twentieth (the store writes that settle the message, and clocks)."""
    return consumer_timeout - 2 * attempt_timeout - consumer_timeout / 20


class BrokerTopologyMismatch(RuntimeError):
    """A router queue exists on the broker with other arguments than the configuration declares."""


class BrokerUnavailable(RuntimeError):
    """The broker could not be reached or did not confirm a publish in time."""


@dataclass(frozen=True)
class BrokerSettings:
    """What the broker layer needs from the `broker:` section of routes.yaml."""

    url: str = "memory://"
    """One broker URL, or the URLs of a cluster's nodes separated by ``;``."""
    queue_type: str = "quorum"
    prefix: str = "router"
    confirm_timeout: float = 30.0
    consumer_timeout: float = DEFAULT_CONSUMER_TIMEOUT

    @property
    def urls(self) -> list[str]:
        """The broker URLs in the order they are tried."""
        return [url.strip() for url in self.url.split(";") if url.strip()]

    @property
    def is_memory(self) -> bool:
        return self.url.startswith("memory://")

    @property
    def display(self) -> str:
        """The URLs fit to print: passwords masked."""
        return redact_urls(self.urls)


def redact_urls(urls: Iterable[str]) -> str:
    """Broker URLs fit to print, each password masked, separated by ``, ``."""
    return ", ".join(redact(url) for url in urls)


class Topology:
    """Names and declarations of the router's exchange and queues for one configuration."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.exchange = Exchange(settings.prefix, type="direct", durable=True, delivery_mode=2)

    def _queue_arguments(self) -> dict[str, Any]:
        if self.settings.is_memory:
            return {}
        # x-consumer-timeout: RabbitMQ 3.12 and later hold the queue's deliveries to the timeout the
        # delivery worker plans for; earlier versions accept the argument and keep their global one.
        return {
            "x-queue-type": self.settings.queue_type,
            "x-single-active-consumer": True,
            "x-consumer-timeout": round(self.settings.consumer_timeout * 1000),
        }

    def ingress_name(self, route: str) -> str:
        return f"{self.settings.prefix}.ingress.{route}"

    def delivery_name(self, target: str, partition: int) -> str:
        return f"{self.settings.prefix}.deliver.{target}.{partition}"

    def ingress_queue(self, route: str) -> Queue:
        """The durable queue that carries a route's raw record chunks to the transform stage.

        Single-active-consumer here too: chunks of one file must be transformed in file order, or
        two worker processes could put a later movement of an item ahead of an earlier one.
        """
        return self._ordered_queue(self.ingress_name(route))

    def delivery_queue(self, target: str, partition: int) -> Queue:
        """One partition queue of a target; single-active-consumer keeps order per sequence key."""
        return self._ordered_queue(self.delivery_name(target, partition))

    def _ordered_queue(self, name: str) -> Queue:
        return Queue(
            name,
            self.exchange,
            routing_key=name,
            durable=True,
            queue_arguments=self._queue_arguments(),
        )

    def delivery_queues(self, target: str, partitions: int) -> list[Queue]:
        return [self.delivery_queue(target, n) for n in range(partitions)]

    def declare(self, connection: Connection, queues: Iterable[Queue]) -> None:
        """Declare the exchange and the given queues (idempotent).

        Raises BrokerTopologyMismatch when a queue already exists with other arguments.
        """
        channel = connection.default_channel
        self.exchange(channel).declare()
        for queue in queues:
            try:
                queue(channel).declare()
            except connection.channel_errors as error:
                if "PRECONDITION_FAILED" not in str(error):
                    raise
                raise BrokerTopologyMismatch(
                    f"{error}. A queue of this router exists with other settings than routes.yaml asks for "
                    "(was broker.queue_type or broker.consumer_timeout changed, or were the queues made "
                    "by a router that did not set x-consumer-timeout?): drain and delete the old queues, "
                    "or use another broker.prefix"
                ) from None


class FailoverConnection(Connection):
    """A kombu connection that tries every URL of its list before it gives up connecting.

    kombu's own connection tries two URLs when opened lazily (``channel()``, ``drain_events``); with
    three nodes and the first two down that would never reach the third.
    """

    def _ensure_connection(
        self,
        errback: Callable[[Exception, float], None] | None = None,
        max_retries: int | None = None,
        interval_start: float = 2,
        interval_step: float = 2,
        interval_max: float = 30,
        callback: Callable[[], None] | None = None,
        reraise_as_library_errors: bool = True,
        timeout: float | None = None,
    ) -> Any:
        if max_retries is not None:
            max_retries = max(max_retries, len(self.alt) - 1)
        # kombu's method named through its class, so the type checker knows it is kombu's (untyped) one.
        return Connection._ensure_connection(
            self,
            errback,
            max_retries,
            interval_start,
            interval_step,
            interval_max,
            callback,
            reraise_as_library_errors,
            timeout,
        )


def connect(settings: BrokerSettings) -> Connection:
    """A kombu connection (opened on first use) over the broker's URLs, tried in turn, with publisher
    confirms on RabbitMQ; fast polling in memory."""
    if settings.is_memory:
        # The embedded transport polls; a short interval keeps the demo and unit tests snappy.
        return Connection(settings.url, transport_options={"polling_interval": 0.005}, connect_timeout=5)
    return FailoverConnection(
        settings.urls,
        failover_strategy="round-robin",
        transport_options={"confirm_publish": True},
        connect_timeout=5,
    )


class Publisher:
    """Publishes persistent JSON messages to router queues and waits for the broker's confirm."""

    def __init__(self, connection: Connection, topology: Topology) -> None:
        self._connection = connection
        self._topology = topology
        self._producer: Producer | None = None

    def _ensure_producer(self) -> Producer:
        if self._producer is None:
            self._connection.ensure_connection(max_retries=1)
            self._producer = Producer(self._connection.default_channel, exchange=self._topology.exchange)
        return self._producer

    def publish(
        self, queue: Queue, body: WireMessage | Mapping[str, Any], *, headers: Mapping[str, Any] | None = None
    ) -> None:
        """Publish one message to ``queue``; returns once the broker confirmed it.

        When the connection fails or the confirm does not come (its node stopped, or sits in a
        minority partition), the message is published again through the next node of the list, once
        per node. Raises :class:`BrokerUnavailable` when no node confirms it, so the caller keeps its
        upstream unacknowledged.
        """
        try:
            producer = self._ensure_producer()
            publish = self._connection.ensure(
                producer,
                producer.publish,
                errback=self._failing_over,
                max_retries=len(self._topology.settings.urls),
                interval_start=0,
            )
            with tracing.publish_span(queue.name, headers) as traced_headers:
                publish(
                    encode_body(body),
                    routing_key=queue.routing_key,
                    content_type=CONTENT_TYPE,
                    content_encoding="utf-8",
                    delivery_mode=2,
                    headers=traced_headers,
                    declare=[queue],
                    retry=False,
                    timeout=self._topology.settings.confirm_timeout,
                )
        except Exception as exc:  # kombu surfaces transport errors as many unrelated types
            self._producer = None
            self._reset_connection()
            raise BrokerUnavailable(f"publish to {queue.name} was not confirmed: {exc}") from exc

    def _failing_over(self, error: Exception, _interval: float) -> None:
        log.warning(
            "broker connection lost while publishing (%s); publishing again through the next node", error
        )

    def _reset_connection(self) -> None:
        try:
            self._connection.collect()
        except Exception:  # a dead connection may fail to tear down; it is being dropped anyway
            log.debug("ignoring error while dropping a broken broker connection", exc_info=True)


@contextmanager
def open_publisher(settings: BrokerSettings, topology: Topology | None = None) -> Iterator[Publisher]:
    """A broker connection with a :class:`Publisher` on it for one thread, released on exit."""
    connection = connect(settings)
    try:
        yield Publisher(connection, topology or Topology(settings))
    finally:
        connection.release()


def queue_depth(connection: Connection, queue: Queue) -> int | None:
    """Messages ready in ``queue``, or None when it does not exist yet."""
    # A passive declare of a missing queue closes the channel on RabbitMQ, so use a throwaway one.
    channel = connection.channel()
    try:
        _, count, _ = queue(channel).queue_declare(passive=True)
    except connection.channel_errors:
        return None
    finally:
        try:
            channel.close()
        except Exception:  # already closed by the broker after a 404
            log.debug("channel closed by the broker", exc_info=True)
    return int(count)
