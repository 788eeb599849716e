"""The bridge from sources to the broker: a chunk becomes one durable, confirmed ingress message."""

from __future__ import annotations

import threading
from typing import Any

from kombu import Connection

from connectors.chunks import SourceChunk
from router.broker import BrokerSettings, Publisher, Topology, connect
from transforms.parsers import RawRecord


def _record(record: RawRecord, identity: str | None, document: int | None) -> dict[str, Any]:
    fields = {
        "n": record.number,
        "line": record.line,
        "data": record.data,
        "error": record.error,
        "id": identity,
        "doc": document,
    }
    return {key: value for key, value in fields.items() if value is not None or key == "data"}


def chunk_message(chunk: SourceChunk) -> dict[str, Any]:
    """The ingress message body for a chunk: its identity plus the raw records, in order.

    Records' document contexts (their header) go once in ``documents``; each record names its own
    by index in ``doc``, so a chunk of lines under one header carries that header once.
    """
    identities = chunk.record_ids or [None] * len(chunk.records)
    documents: list[Any] = []
    index: dict[int, int] = {}
    records = []
    for record, identity in zip(chunk.records, identities, strict=True):
        position = None
        if record.document is not None:
            # Records under one header share the parser's object, so identity finds the repeats.
            position = index.setdefault(id(record.document), len(documents))
            if position == len(documents):
                documents.append(record.document)
        records.append(_record(record, identity, position))
    body = {
        "route": chunk.route,
        "system": chunk.system,
        "message_id": chunk.message_id,
        "origin": chunk.origin,
        "chunk": chunk.chunk,
        "records": records,
        **chunk.extra,
    }
    if documents:
        body["documents"] = documents
    return body


class IngressPublisher:
    """A chunk sink that publishes to the route's ingress queue and returns once confirmed."""

    def __init__(self, publisher: Publisher, topology: Topology) -> None:
        self._publisher = publisher
        self._topology = topology

    def __call__(self, chunk: SourceChunk) -> None:
        self._publisher.publish(
            self._topology.ingress_queue(chunk.route),
            chunk_message(chunk),
            headers={"message_id": chunk.message_id},
        )


class SharedIngressSink:
    """A chunk sink many threads may call at once (webhook requests): one broker connection per thread.

    A kombu connection must not be shared between threads, and one connection per request would
    cost a TCP and AMQP handshake per webhook; a connection per worker thread avoids both.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self._settings = settings
        self._topology = Topology(settings)
        self._local = threading.local()
        self._connections: list[Connection] = []
        self._lock = threading.Lock()

    def __call__(self, chunk: SourceChunk) -> None:
        sink: IngressPublisher | None = getattr(self._local, "sink", None)
        if sink is None:
            connection = connect(self._settings)
            with self._lock:
                self._connections.append(connection)
            sink = IngressPublisher(Publisher(connection, self._topology), self._topology)
            self._local.sink = sink
        sink(chunk)

    def close(self) -> None:
        """Release every thread's connection."""
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.release()
