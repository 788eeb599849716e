"""What the delivery worker decides for each event before sending it, and when a partition's messages go.

- Dedup: an event recorded as delivered to the target is not sent again (effectively-once) unless a
  history replay re-sends it; nor is one that already has a letter there.
- Stale guard: a stock.snapshot older than the newest applied for its key is skipped, replayed or not.
- Blocked keys: a key with an open dead letter at the target parks its later events (``router.parking``).
- Batching: the messages a partition's consumer holds go out together once they hold
  ``batch.max_events`` events or the oldest has waited ``batch.max_wait``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kombu.message import Message

from router.messages import REPLAY_HEADER, decode_batch
from state import DeliveryState, occurred_at_of

SNAPSHOT_TYPE = "stock.snapshot"


class Verdict(StrEnum):
    """What becomes of one event bound for a target."""

    send = "send"
    duplicate = "duplicate"
    """Delivered there before: not sent again."""
    lettered = "lettered"
    """Already a dead or parked letter there (a message taken again after a crash): left to it."""
    park = "park"
    """Its key is blocked there by an open dead letter: it waits as a parked letter."""
    stale = "stale"
    """A stock snapshot older than the newest applied for its key: applying it would roll stock back."""


@dataclass
class SequenceGuard:
    """The verdicts of one pass over a batch, from what the store knew of it, kept current as the pass
    goes: a copy later in the batch is a duplicate, a newer snapshot moves its key's mark, a key
    dead-lettered on the way blocks its later events."""

    state: DeliveryState

    def verdict(self, event: Mapping[str, Any], replay: bool) -> Verdict:
        state = self.state
        event_id, key = event["event_id"], event.get("sequence_key")
        if event_id in state.delivered and not replay:
            return Verdict.duplicate
        if event_id in state.lettered:
            return Verdict.lettered
        if key is not None and key in state.blocked:
            return Verdict.park
        occurred = occurred_at_of(event)
        if event.get("type") == SNAPSHOT_TYPE and key is not None and occurred is not None:
            newest = state.snapshot_marks.get(key)
            if newest is not None and occurred < newest:
                return Verdict.stale
            if newest is None or occurred > newest:
                state.snapshot_marks[key] = occurred
        # A re-ingested copy later in the same batch is a duplicate of this one.
        state.delivered.add(event_id)
        return Verdict.send

    def is_blocked(self, event: Mapping[str, Any]) -> bool:
        """Whether ``event``'s key has an open dead letter at the target (then the event parks)."""
        key = event.get("sequence_key")
        return key is not None and key in self.state.blocked

    def block(self, event: Mapping[str, Any]) -> None:
        """``event`` was dead-lettered: its key's later events park behind it."""
        key = event.get("sequence_key")
        if key is not None:
            self.state.blocked.add(key)


@dataclass(frozen=True)
class InboundBatch:
    """A partition message with its decoded events, when it arrived (for ``max_wait``), a moment before
    the broker sent it (its consumer timeout runs from then), and whether it is a history replay."""

    message: Message
    events: list[dict[str, Any]]
    received: float
    held_since: float
    replay: bool = False

    @classmethod
    def of(cls, message: Message, held_since: float) -> InboundBatch:
        """Decode a partition message; raises MalformedMessage when it is not a batch of routed events."""
        replay = bool((message.headers or {}).get(REPLAY_HEADER))
        events = decode_batch(message.body).events
        return cls(message, events, time.monotonic(), held_since, replay)


def flush_due(pending: Sequence[InboundBatch], max_events: int | None, max_wait: float) -> bool:
    """Whether the messages in hand go out now: always without micro-batches, else once they hold
    ``max_events`` events or the oldest has waited ``max_wait`` seconds."""
    if max_events is None:
        return True
    count = sum(len(item.events) for item in pending)
    return count >= max_events or time.monotonic() - pending[0].received >= max_wait
