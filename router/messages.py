"""The router's two internal wire contracts, typed and versioned: the ingress chunk and the partition batch.

A source's chunk of raw records goes to the transform worker as an :class:`IngressChunk` on
``<prefix>.ingress.<route>``; the events the transform worker routes to one partition of a target go to
the delivery worker as a :class:`PartitionBatch` on ``<prefix>.deliver.<target>.<n>``. Both are encoded
and decoded here only: compact UTF-8 JSON (msgspec), Decimals as their exact strings. Decoding checks
the shape and raises :class:`MalformedMessage` saying what is wrong and where. A message without a
``version`` was written by the release before versions existed, in the layout of version 1, and reads
as such; a version this router does not know is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

CHUNK_VERSION = 1
BATCH_VERSION = 1
MALFORMED_MESSAGE = "malformed_message"
"""Dead-letter reason of a whole queue message the router cannot read: kept to inspect, not to replay."""
REPLAY_HEADER = "x-router-replay"
"""Header of a partition batch `router replay` re-sends: its events bypass the delivered-events ledger,
which would otherwise refuse exactly the events a restored target needs again. They do not bypass the
stale guard: a replayed snapshot older than one applied since would roll stock back."""


class MalformedMessage(ValueError):
    """A queue message that is not the router's chunk or batch (or of a version it does not read)."""


class ChunkRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """One raw record of a chunk: its number in the upstream message, where it starts, its data or parse
    error, the identity the source gave it (``id``), the index of its document context in the chunk's
    ``documents`` (``doc``), and the event id a replayed dead letter keeps (``event_id``)."""

    n: int
    line: int | None = None
    data: Any = None
    error: str | None = None
    id: str | None = None
    doc: int | None = None
    event_id: str | None = None


class IngressChunk(msgspec.Struct, frozen=True):
    """Raw records of one upstream message on their way to the transform (see ``connectors.chunks``).

    ``id_origin``, when set, replaces ``origin`` in event ids (``{}`` for EDI, whose record ids are
    complete). Document contexts (headers) go once in ``documents``; records name theirs by index.
    """

    route: str
    system: str
    message_id: str
    records: list[ChunkRecord]
    origin: dict[str, Any] = {}
    chunk: int = 1
    # UNSET fields are left out of the JSON, as the release before versions left them out.
    id_origin: dict[str, Any] | UnsetType = UNSET
    documents: list[Any] | UnsetType = UNSET
    version: int = CHUNK_VERSION

    def problem(self) -> str | None:
        """What the types alone do not check: each record names a document the chunk carries."""
        carried = 0 if self.documents is UNSET else len(self.documents)
        for index, record in enumerate(self.records, start=1):
            if record.doc is not None and not 0 <= record.doc < carried:
                return f"record {index} names document {record.doc}; the chunk carries {carried}"
        return None

    @property
    def identity_origin(self) -> dict[str, Any]:
        """What of the origin makes the chunk's event ids unique."""
        return self.origin if self.id_origin is UNSET else self.id_origin

    def document_of(self, record: ChunkRecord) -> Any:
        """The document context (header) ``record`` was read under, or None."""
        if record.doc is None or self.documents is UNSET:
            return None
        return self.documents[record.doc]


class PartitionBatch(msgspec.Struct, frozen=True):
    """Canonical events bound for one partition queue of a target, in delivery order.

    ``route`` names the route whose chunk they came from; a history replay, which mixes routes, has none.
    """

    target: str
    partition: int
    events: list[dict[str, Any]]
    route: str | UnsetType = UNSET
    version: int = BATCH_VERSION

    def problem(self) -> str | None:
        """What the types alone do not check: each event has its id and its source route (what the
        delivery worker's ledger and dead letters need)."""
        for index, event in enumerate(self.events, start=1):
            source = event.get("source")
            if not isinstance(event.get("event_id"), str):
                return f"event {index} has no 'event_id' text"
            if not isinstance(source, Mapping) or not isinstance(source.get("route"), str):
                return f"event {index} has no 'source' with a 'route' text"
        return None


class _Versioned(msgspec.Struct):
    version: int = 1


WireMessage = IngressChunk | PartitionBatch
Contract = TypeVar("Contract", IngressChunk, PartitionBatch)
_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[Any]] = {
    IngressChunk: msgspec.json.Decoder(IngressChunk),
    PartitionBatch: msgspec.json.Decoder(PartitionBatch),
}
_NEWEST: dict[type, int] = {IngressChunk: CHUNK_VERSION, PartitionBatch: BATCH_VERSION}
_NAMES: dict[type, str] = {IngressChunk: "ingress chunk", PartitionBatch: "partition batch"}


def encode_body(body: WireMessage | Mapping[str, Any]) -> bytes:
    """A message body as compact UTF-8 JSON, Decimals as exact strings (a float would round quantities)."""
    return _encoder.encode(body)


def decode_chunk(body: bytes | str | Mapping[str, Any]) -> IngressChunk:
    """An ingress message as a chunk; MalformedMessage saying what is wrong when it is not one."""
    return _decode(body, IngressChunk)


def decode_batch(body: bytes | str | Mapping[str, Any]) -> PartitionBatch:
    """A partition message as a batch of routed events; MalformedMessage saying what is wrong otherwise."""
    return _decode(body, PartitionBatch)


def _decode(body: bytes | str | Mapping[str, Any], kind: type[Contract]) -> Contract:
    name = _NAMES[kind]
    try:
        if isinstance(body, Mapping):
            message: Contract = msgspec.convert(body, kind)
        else:
            message = _decoders[kind].decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        # A newer layout fails the checks of this one; say the version, the real cause.
        raise MalformedMessage(f"{name}: {_unknown_version(body, kind) or error}") from None
    problem = _version_problem(message.version, kind) or message.problem()
    if problem is not None:
        raise MalformedMessage(f"{name}: {problem}")
    return message


def _unknown_version(body: bytes | str | Mapping[str, Any], kind: type) -> str | None:
    try:
        if isinstance(body, Mapping):
            versioned = msgspec.convert(body, _Versioned)
        else:
            versioned = msgspec.json.decode(body, type=_Versioned)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return _version_problem(versioned.version, kind)


def _version_problem(version: int, kind: type) -> str | None:
    newest = _NEWEST[kind]
    if 1 <= version <= newest:
        return None
    return f"unknown version {version}: this router reads versions 1 to {newest} (a newer one wrote it?)"


def readable_body(body: Any) -> Any:
    """A queue message's body as text, for a dead letter an operator can read."""
    return body.decode("utf-8", "replace") if isinstance(body, bytes) else body
