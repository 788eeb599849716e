"""The bridge from sources to the broker: a chunk becomes one durable, confirmed ingress message."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from kombu import Queue
from msgspec import UNSET

from connectors.chunks import SourceChunk
from ops import tracing
from router.broker import BrokerSettings, Publisher, Topology
from router.confirms import ConfirmWindow, Outgoing
from router.messages import ChunkRecord, IngressChunk, encode_body


def chunk_message(chunk: SourceChunk) -> IngressChunk:
    """The ingress message for a chunk: its identity plus the raw records, in order.

    Records' document contexts (their header) go once in ``documents``; each record names its own
    by index in ``doc``, so a chunk of lines under one header carries that header once.
    """
    identities: Sequence[str | None] = chunk.record_ids or [None] * len(chunk.records)
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
        records.append(ChunkRecord(record.number, record.line, record.data, record.error, identity, position))
    return IngressChunk(
        route=chunk.route,
        system=chunk.system,
        message_id=chunk.message_id,
        origin=chunk.origin,
        chunk=chunk.chunk,
        records=records,
        id_origin=UNSET if chunk.id_origin is None else chunk.id_origin,
        documents=documents or UNSET,
    )


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


class IngressGroupPublisher:
    """Publishes groups of chunks to their routes' ingress queues under one confirm window (webhook intake).

    Called from one thread at a time (the intake's); returns once RabbitMQ confirmed every chunk.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self._topology = Topology(settings)
        self._window = ConfirmWindow(settings, self._topology)
        self._queues: dict[str, Queue] = {}

    def __call__(self, chunks: Sequence[SourceChunk]) -> None:
        # Taken before any span opens: a chunk without a context of its own must not become the child
        # of the previous chunk's publish span, which is still open.
        outside = tracing.current_context()
        with ExitStack() as spans:
            outgoing = []
            for chunk in chunks:
                queue = self._queue(chunk.route)
                headers = spans.enter_context(
                    tracing.publish_span(queue.name, {"message_id": chunk.message_id}, chunk.trace or outside)
                )
                outgoing.append(Outgoing(queue, encode_body(chunk_message(chunk)), headers))
            self._window.publish(outgoing)

    def _queue(self, route: str) -> Queue:
        if route not in self._queues:
            self._queues[route] = self._topology.ingress_queue(route)
        return self._queues[route]

    def close(self) -> None:
        """Release the broker connection."""
        self._window.close()
