"""The bridge from sources to the broker: a chunk becomes one durable, confirmed ingress message."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

from kombu import Queue
from msgspec import UNSET

from connectors.chunks import SourceChunk
from ops import tracing
from router.broker import BrokerSettings, Topology
from router.confirms import ConfirmWindow, Outgoing
from router.messages import ChunkRecord, IngressChunk, encode_body

INGRESS_WINDOW = 8
"""Chunks a file source keeps unconfirmed while it reads on: enough to hide the confirm round trip,
few enough that a file's memory stays a few chunks whatever its size."""


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


class _IngressQueues:
    """Each route's ingress queue, built once."""

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self._queues: dict[str, Queue] = {}

    def __call__(self, route: str) -> Queue:
        if route not in self._queues:
            self._queues[route] = self._topology.ingress_queue(route)
        return self._queues[route]


class IngressPublisher:
    """A chunk sink for one source thread, publishing to the routes' ingress queues.

    Called as a plain sink, it returns once the chunk is confirmed. Through :meth:`send` it keeps up to
    ``window`` chunks unconfirmed while the source reads on, reporting each chunk once RabbitMQ
    confirmed it; :meth:`flush` returns once all are (a file is archived only after that).
    """

    def __init__(self, settings: BrokerSettings, topology: Topology, *, window: int = INGRESS_WINDOW) -> None:
        self._queue = _IngressQueues(topology)
        self._confirms = ConfirmWindow(settings, topology)
        self._window = window
        self._in_flight: deque[tuple[int, SourceChunk, Callable[[SourceChunk], None]]] = deque()

    def __call__(self, chunk: SourceChunk) -> None:
        self.send(chunk, _ignore)
        self.flush()

    def send(self, chunk: SourceChunk, confirmed: Callable[[SourceChunk], None]) -> None:
        """Publish ``chunk``; ``confirmed(chunk)`` is called, in this thread and in publishing order,
        once RabbitMQ confirmed it (during a later ``send`` or the ``flush``). Raises
        :class:`router.broker.BrokerUnavailable` when a chunk in flight was not confirmed; those
        chunks are then never reported."""
        queue = self._queue(chunk.route)
        try:
            with tracing.publish_span(queue.name, {"message_id": chunk.message_id}) as headers:
                number = self._confirms.send([Outgoing(queue, encode_body(chunk_message(chunk)), headers)])
            self._in_flight.append((number, chunk, confirmed))
            if len(self._in_flight) > self._window:
                self._confirms.wait_for(self._in_flight[0][0])
            self._report()
        except BaseException:
            self._in_flight.clear()
            raise

    def flush(self) -> None:
        """Return once every chunk sent was confirmed and reported; raise like :meth:`send`."""
        try:
            if self._in_flight:
                self._confirms.wait_for(self._in_flight[-1][0])
            self._report()
        finally:
            self._in_flight.clear()

    def _report(self) -> None:
        confirmed = self._confirms.confirmed
        while self._in_flight and self._in_flight[0][0] <= confirmed:
            _, chunk, report = self._in_flight.popleft()
            report(chunk)

    def close(self) -> None:
        """Release the broker connection."""
        self._confirms.close()


def _ignore(_: SourceChunk) -> None:
    """What a plain sink call does with the confirm report: it returns once confirmed."""


class IngressGroupPublisher:
    """Publishes groups of chunks to their routes' ingress queues under one confirm window (webhook intake).

    Called from one thread at a time (the intake's); returns once RabbitMQ confirmed every chunk.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self._topology = Topology(settings)
        self._window = ConfirmWindow(settings, self._topology)
        self._queue = _IngressQueues(self._topology)

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

    def close(self) -> None:
        """Release the broker connection."""
        self._window.close()
