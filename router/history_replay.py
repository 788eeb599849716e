"""History replay: re-sending what a target was delivered, for `router replay` and the console.

Journalled events go to the target's partition queues in journal order with a header that lets them
past the delivered-events ledger. Replayed stock snapshots still pass the stale guard like live ones,
and each key's replay ends on its newest snapshot (:func:`newest_last`), so a replay during live
traffic never leaves a target on an older level.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from canonical.ids import partition_for
from router.broker import open_publisher
from router.messages import REPLAY_HEADER, PartitionBatch
from router.replay import Progress, ReplayError, Republisher, no_progress
from router.sequencing import SNAPSHOT_TYPE
from state import JournalEntry

REPLAY_MESSAGE_EVENTS = 200


class HistoryReplayer(Republisher):
    """Re-sends a target's delivered history for one configuration, as ``actor``."""

    def history(
        self, target: str, *, since: datetime, until: datetime | None = None, sequence_key: str | None = None
    ) -> list[JournalEntry]:
        """What to re-send to ``target``: its journal (delivered_at in [since, until)) in delivery order,
        with each key's stock snapshots ending on the newest one applied (see :func:`newest_last`)."""
        if target not in self.config.targets:
            raise ReplayError(
                f"no target named {target!r}; the configuration has: {', '.join(self.config.targets)}"
            )
        entries = self.store.journal(target, since=since, until=until, sequence_key=sequence_key)
        keys = {entry.sequence_key for entry in entries if _is_snapshot(entry) and entry.sequence_key}
        return newest_last(entries, self.store.newest_snapshots(target, keys))

    def replay_history(
        self,
        target: str,
        *,
        since: datetime,
        until: datetime | None = None,
        sequence_key: str | None = None,
        progress_for: Callable[[int], AbstractContextManager[Progress]] | None = None,
    ) -> int:
        """Re-send ``target``'s journal in [since, until) (one key or all) in order; returns the count.

        ``progress_for(total)`` may give a progress callback for the re-send. Raises ReplayError for an
        unknown target and BrokerNotShared before sending anything to a memory:// broker.
        """
        entries = self.history(target, since=since, until=until, sequence_key=sequence_key)
        self.require_shared_broker(f"re-sending {target}'s history")
        if entries:
            why = {
                "since": since.isoformat(),
                "until": until.isoformat() if until else None,
                "key": sequence_key,
            }
            if progress_for is None:
                self.resend(target, entries, why=why)
            else:
                with progress_for(len(entries)) as advance:
                    self.resend(target, entries, why=why, progress=advance)
        return len(entries)

    def resend(
        self,
        target: str,
        entries: Sequence[JournalEntry],
        *,
        why: Mapping[str, Any],
        progress: Progress = no_progress,
    ) -> None:
        """Re-send journal ``entries`` to ``target``'s partition queues in journal order, same event ids.

        Events of one key share a partition and are published in journal order, so order per key holds;
        ``why`` (the filter used) goes to the audit trail with the count.
        """
        partitions = self.config.targets[target].partitions
        buffers: dict[int, list[dict[str, Any]]] = {}
        with open_publisher(self.broker, self.topology) as sink:

            def flush(partition: int) -> None:
                events = buffers.pop(partition)
                sink.publish(
                    self.topology.delivery_queue(target, partition),
                    PartitionBatch(target=target, partition=partition, events=events),
                    headers={REPLAY_HEADER: True},
                )
                progress(len(events))

            for entry in entries:
                partition = partition_for(entry.sequence_key or "", partitions)
                buffers.setdefault(partition, []).append(entry.event)
                if len(buffers[partition]) >= REPLAY_MESSAGE_EVENTS:
                    flush(partition)
            for partition in list(buffers):
                flush(partition)
        self.store.audit("replay", f"target:{target}", {**why, "events": len(entries)}, actor=self.actor)


def _is_snapshot(entry: JournalEntry) -> bool:
    return entry.event.get("type") == SNAPSHOT_TYPE


def newest_last(entries: Sequence[JournalEntry], newest: Mapping[str, JournalEntry]) -> list[JournalEntry]:
    """The replay rule for stock snapshots: a key's snapshots older than its newest applied one
    (``newest``, the snapshot mark) are left out, since that level supersedes them, and when the
    window does not end on the newest one it is re-sent after the key's other events, so the last
    level the restored target applies is the newest known."""
    kept: list[JournalEntry] = []
    last_snapshot: dict[str, str] = {}
    for entry in entries:
        key = entry.sequence_key
        mark = newest.get(key) if key is not None and _is_snapshot(entry) else None
        if key is None or mark is None:
            kept.append(entry)
            continue
        if _older(entry, mark):
            continue
        kept.append(entry)
        last_snapshot[key] = entry.event_id
    for key, mark in newest.items():
        if last_snapshot.get(key) != mark.event_id:
            kept.append(mark)
    return kept


def _older(entry: JournalEntry, mark: JournalEntry) -> bool:
    if entry.occurred_at is None or mark.occurred_at is None:
        return False
    return entry.occurred_at < mark.occurred_at
