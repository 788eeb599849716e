"""The unit every source hands to the router: a chunk of raw records from one upstream message."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol, TypeVar, runtime_checkable

from transforms.parsers import RawRecord

Batched = TypeVar("Batched")


@dataclass(frozen=True)
class SourceChunk:
    """Raw records of one upstream message (a file, a request, a page), split for transport.

    ``origin`` identifies the upstream message (file name and content hash, webhook id); together
    with each record's identity it is what event ids derive from, so the same input always yields
    the same events. A record's identity is its number in the message, unless the source knows a
    better one (a REST record's own id): then ``record_ids`` gives one per record, and ``origin``
    holds only what stays stable across re-polls. ``id_origin``, when given, replaces ``origin`` in event
    ids (``{}`` for EDI, whose record ids are complete).
    ``trace`` is the trace context the chunk was taken in, when another thread publishes it.
    """

    route: str
    system: str
    message_id: str
    origin: dict[str, Any]
    records: list[RawRecord]
    chunk: int = 1
    record_ids: list[str] | None = None
    id_origin: dict[str, Any] | None = None
    trace: Any = None


ChunkSink = Callable[[SourceChunk], None]
"""Publishes a chunk durably; returns only once the broker confirmed, raises otherwise."""


@runtime_checkable
class PipelinedSink(Protocol):
    """A sink that can also keep a few chunks unconfirmed while its caller reads on."""

    def __call__(self, chunk: SourceChunk) -> None: ...

    def send(self, chunk: SourceChunk, confirmed: Callable[[SourceChunk], None]) -> None:
        """Publish ``chunk``; ``confirmed(chunk)`` is called in order once the broker confirmed it."""
        ...

    def flush(self) -> None:
        """Return once every chunk sent was confirmed (and reported); raise otherwise."""
        ...


def batched(records: Iterable[Batched], size: int) -> Iterator[list[Batched]]:
    """Split a record stream (records, or records with their ids) into lists of at most ``size``
    without materialising it."""
    iterator = iter(records)
    while batch := list(islice(iterator, size)):
        yield batch
