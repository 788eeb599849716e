"""Replay and repair: what `router deadletter replay|edit|discard` and `router replay` do.

Replaying a letter depends on where it failed:
- delivery: it becomes ``parked`` again; being the oldest letter of its key, the running router's
  delivery worker releases it first and then the events parked behind it, in order;
- transform: its (possibly edited) raw record goes back to the route's ingress queue as a one-record
  message that keeps the record's original event id, so the target sees the same event;
- ingress: the rejected file moves from the errors folder back to the inbox.

`router replay` re-sends journalled events to a target's partition queues in journal order with a
header that lets them past the delivered-events ledger and the stale-snapshot guard.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from canonical.events import parse_event
from canonical.ids import partition_for
from deadletter.store import DeadLetter, JournalEntry, Store
from router import assembly
from router.broker import Publisher, Topology, publisher
from router.config import RouterConfig
from router.pipeline import validation_detail
from router.workers import MALFORMED_MESSAGE, REPLAY_HEADER

REPLAY_MESSAGE_EVENTS = 200

Progress = Callable[[int], None]


class ReplayError(ValueError):
    """A letter or a request that cannot be replayed as asked, saying which and why."""


@dataclass
class ReplayReport:
    """What a replay did: letters moved on, letters left alone (with why), and for history, events."""

    replayed: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    events: int = 0


def _ignore_progress(_: int) -> None:
    return None


@dataclass
class Replayer:
    """Replays dead letters and journal history for one configuration, as ``actor``."""

    config: RouterConfig
    store: Store
    actor: str

    def __post_init__(self) -> None:
        self.broker = assembly.broker_settings(self.config)
        self.topology = Topology(self.broker)

    def replay_letters(
        self, letters: Sequence[DeadLetter], *, reason: str, progress: Progress = _ignore_progress
    ) -> ReplayReport:
        """Replay ``letters`` (oldest first); letters that are not ``dead`` are reported, not touched."""
        report = ReplayReport()
        waiting: list[DeadLetter] = []
        for letter in letters:
            if letter.status != "dead" or letter.reason == MALFORMED_MESSAGE:
                report.skipped[letter.id] = _not_replayable(letter)
                progress(1)
            elif letter.stage == "delivery":
                waiting.append(letter)
        if waiting:
            moved = self.store.reopen_parked(
                [letter.id for letter in waiting], actor=self.actor, reason=reason
            )
            report.replayed.extend(moved)
            for letter in waiting:
                if letter.id not in moved:
                    report.skipped[letter.id] = "its status changed while replaying; look at it again"
            progress(len(waiting))
        replayable = [x for x in letters if x.id not in report.skipped]
        needs_broker = [x for x in replayable if x.stage == "transform"]
        for letter in (x for x in replayable if x.stage == "ingress"):
            self._return_file(letter, reason, report)
            progress(1)
        if needs_broker:
            with publisher(self.broker, self.topology) as sink:
                for letter in needs_broker:
                    self._republish_record(sink, letter, reason, report)
                    progress(1)
        report.replayed.sort()
        return report

    def _republish_record(
        self, sink: Publisher, letter: DeadLetter, reason: str, report: ReplayReport
    ) -> None:
        try:
            message = record_message(letter)
        except ReplayError as error:
            report.skipped[letter.id] = str(error)
            return
        sink.publish(self.topology.ingress_queue(letter.route), message, headers={"replay_of": letter.id})
        self.store.set_status(letter.id, "replayed", actor=self.actor, reason=reason, only_from=("dead",))
        report.replayed.append(letter.id)

    def _return_file(self, letter: DeadLetter, reason: str, report: ReplayReport) -> None:
        try:
            route = self.config.route(letter.route)
        except KeyError as error:
            report.skipped[letter.id] = str(error.args[0])
            return
        if route.source.type != "file":
            report.skipped[letter.id] = f"route {letter.route!r} has no file source to return the file to"
            return
        held = (letter.payload or {}).get("file") if isinstance(letter.payload, Mapping) else None
        if not held or not Path(held).is_file():
            report.skipped[letter.id] = f"the rejected file {held!r} is no longer in the errors folder"
            return
        rejected = Path(held)
        inbox = assembly.file_drop_settings(self.config, route).inbox
        inbox.mkdir(parents=True, exist_ok=True)
        shutil.move(rejected, inbox / rejected.name)
        rejected.with_name(rejected.name + ".reason.txt").unlink(missing_ok=True)
        self.store.set_status(letter.id, "replayed", actor=self.actor, reason=reason, only_from=("dead",))
        report.replayed.append(letter.id)

    def discard(self, letters: Sequence[DeadLetter], *, reason: str) -> ReplayReport:
        """Discard open letters for good; a discarded delivery letter releases the events parked behind it."""
        report = ReplayReport()
        for letter in letters:
            if letter.status not in ("dead", "parked"):
                report.skipped[letter.id] = f"it is already {letter.status}"
                continue
            self.store.set_status(
                letter.id, "discarded", actor=self.actor, reason=reason, only_from=("dead", "parked")
            )
            report.replayed.append(letter.id)
        return report

    def edit(self, letter: DeadLetter, payload: Any, *, reason: str) -> ReplayReport:
        """Validate an operator's corrected payload, store it (audited) and replay the letter."""
        checked = self.validate_payload(letter, payload)
        edited = self.store.update_payload(letter.id, checked, actor=self.actor, reason=reason)
        return self.replay_letters([edited], reason=reason)

    def check_editable(self, letter: DeadLetter) -> None:
        """Raise ReplayError when ``letter`` cannot be edited and replayed (its status or stage)."""
        if letter.status != "dead" or letter.reason == MALFORMED_MESSAGE:
            raise ReplayError(f"dead letter {letter.id}: {_not_replayable(letter)}")
        if letter.stage == "ingress":
            raise ReplayError(
                f"dead letter {letter.id} is a rejected file ({letter.detail}); fix the file in the errors "
                "folder and replay the letter instead of editing it"
            )

    def validate_payload(self, letter: DeadLetter, payload: Any) -> Any:
        """The payload to store for ``letter``, or ReplayError saying what is wrong with it."""
        self.check_editable(letter)
        if not isinstance(payload, dict):
            raise ReplayError(
                f"dead letter {letter.id}: the payload must be a JSON object, got {type(payload).__name__}"
            )
        if letter.stage == "delivery":
            return _checked_event(letter, payload)
        return self._checked_record(letter, payload)

    def _checked_record(self, letter: DeadLetter, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            route = self.config.route(letter.route)
        except KeyError as error:
            raise ReplayError(f"dead letter {letter.id}: {error.args[0]}") from None
        pipeline = assembly.build_pipelines(self.config, [route])[route.name]
        result = pipeline.transform(record_message(replace(letter, payload=payload)))
        if result.failures:
            problems = "; ".join(failure.detail for failure in result.failures)
            raise ReplayError(f"dead letter {letter.id}: the edited record still fails: {problems}")
        return payload

    def history(
        self, target: str, *, since: datetime, until: datetime | None = None, sequence_key: str | None = None
    ) -> list[JournalEntry]:
        """The journal of ``target`` (delivered_at in [since, until)), in the order it was delivered."""
        if target not in self.config.targets:
            raise ReplayError(
                f"no target named {target!r}; the configuration has: {', '.join(self.config.targets)}"
            )
        return self.store.journal(target, since=since, until=until, sequence_key=sequence_key)

    def resend(
        self,
        target: str,
        entries: Sequence[JournalEntry],
        *,
        why: Mapping[str, Any],
        progress: Progress = _ignore_progress,
    ) -> None:
        """Re-send journal ``entries`` to ``target``'s partition queues in journal order, same event ids.

        Events of one key share a partition and are published in journal order, so order per key holds;
        ``why`` (the filter used) goes to the audit trail with the count.
        """
        partitions = self.config.targets[target].partitions
        buffers: dict[int, list[dict[str, Any]]] = {}
        with publisher(self.broker, self.topology) as sink:

            def flush(partition: int) -> None:
                events = buffers.pop(partition)
                sink.publish(
                    self.topology.delivery_queue(target, partition),
                    {"target": target, "partition": partition, "events": events},
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


def _not_replayable(letter: DeadLetter) -> str:
    if letter.reason == MALFORMED_MESSAGE:
        return "it holds a queue message the router could not read, not a record: see `show`, then discard"
    if letter.status == "parked":
        return "it is parked behind an earlier dead letter of its key; replay or discard that one"
    return f"it is already {letter.status}"


def _checked_event(letter: DeadLetter, payload: dict[str, Any]) -> dict[str, Any]:
    original = letter.payload if isinstance(letter.payload, Mapping) else {}
    for name in ("event_id", "sequence_key"):
        if payload.get(name) != original.get(name):
            raise ReplayError(
                f"dead letter {letter.id}: {name} must stay {original.get(name)!r} "
                f"(got {payload.get(name)!r}); it ties the event to its key and to the target's idempotency"
            )
    try:
        event = parse_event(payload).model_dump(mode="json", exclude_none=True)
    except ValidationError as error:
        raise ReplayError(
            f"dead letter {letter.id}: the edited event is not valid: {validation_detail(error)}"
        ) from None
    event["sequence_key"] = payload["sequence_key"]
    return event


def record_message(letter: DeadLetter) -> dict[str, Any]:
    """A one-record ingress message for a transform-stage letter, keeping its original event id."""
    if letter.stage != "transform":
        raise ReplayError(f"dead letter {letter.id} is a {letter.stage} letter, not a failed record")
    source = letter.source_ref or {}
    record: dict[str, Any] = {
        "n": source.get("record") or 1,
        "line": source.get("line"),
        "data": letter.payload,
    }
    if letter.event_id:
        record["event_id"] = letter.event_id
    message = {
        "route": letter.route,
        "system": source.get("system") or letter.route,
        "message_id": source.get("message_id") or f"deadletter-{letter.id}",
        "origin": {"file": source["file"]} if source.get("file") else {},
        "records": [record],
    }
    if source.get("document") is not None:
        # The header the record was read under (XML ancestors, CSV preamble, fixed-width header).
        record["doc"] = 0
        message["documents"] = [source["document"]]
    return message
