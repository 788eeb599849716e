"""Replay and repair of dead letters: what `router deadletter replay|edit|discard` and the console do.

Replaying a letter depends on where it failed:
- delivery: it becomes ``parked`` again; being the oldest letter of its key, the running router's
  delivery worker releases it first and then the events parked behind it, in order;
- transform: its (possibly edited) raw record goes back to the route's ingress queue as a one-record
  message that keeps the record's original event id, so the target sees the same event;
- ingress: the rejected file moves from the errors folder back to the inbox.

Re-sending delivered history (`router replay`) is :mod:`router.history_replay`; both publish through
:class:`Republisher`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from msgspec import UNSET
from pydantic import ValidationError

from canonical.events import parse_event
from connectors.file_ingest import Refusal
from deadletter import DeadLetter, DeadLetterStateError, StatusChange
from router import assembly
from router.broker import Publisher, Topology, open_publisher
from router.config import RouterConfig
from router.messages import MALFORMED_MESSAGE, ChunkRecord, IngressChunk
from router.pipeline import validation_detail
from state import Store

BULK_LIMIT = 1_000_000
"""At most this many letters are replayed by one filtered (bulk) replay."""

Progress = Callable[[int], None]


class ReplayError(ValueError):
    """A letter or a request that cannot be replayed as asked, saying which and why."""


class LetterNotDead(ReplayError):
    """The letter is no longer ``dead`` (replayed, discarded, parked): a state to look at, not bad usage."""


class BrokerNotShared(ReplayError):
    """A replay would publish to ``memory://``, a broker inside this process that no router reads."""


@dataclass
class ReplayReport:
    """What a replay did: letters moved on, letters left alone (with why), and for history, events."""

    replayed: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    events: int = 0


def no_progress(_: int) -> None:
    """The progress callback of a caller that shows none."""
    return None


@dataclass
class Republisher:
    """What a replay publishes with: one configuration's broker, its store, and who acts (audited)."""

    config: RouterConfig
    store: Store
    actor: str

    def __post_init__(self) -> None:
        self.broker = assembly.broker_settings(self.config)
        self.topology = Topology(self.broker)

    def require_shared_broker(self, what: str) -> None:
        """Raise BrokerNotShared when ``what`` would be published to this process's own memory broker."""
        if self.broker.is_memory:
            raise BrokerNotShared(
                f"{what} would be published to broker.url memory://, a broker inside this command's own "
                "process that no running router reads, and would be lost. Point broker.url at the "
                "RabbitMQ the router uses (amqp://...), or run the command where it can reach that broker"
            )


class Replayer(Republisher):
    """Replays, edits and discards dead letters for one configuration, as ``actor``."""

    def replayable(self, **filters: Any) -> list[DeadLetter]:
        """The ``dead`` letters matching ``filters`` (those of Store.list_dead_letters), oldest first:
        what a filtered replay replays."""
        return self.store.list_dead_letters(status="dead", limit=BULK_LIMIT, **filters)

    def replay_letters(
        self, letters: Sequence[DeadLetter], *, reason: str, progress: Progress = no_progress
    ) -> ReplayReport:
        """Replay ``letters`` (oldest first); letters that are not ``dead`` are reported, not touched.

        Each letter moves on only from ``dead``, checked when it moves: a letter another operator (or the
        router) changed since it was read is reported with who did it, and is not replayed twice.
        Raises BrokerNotShared before changing anything when a record would go to a memory:// broker.
        """
        records = [x for x in letters if x.stage == "transform" and x.status == "dead"]
        if records:
            self.require_shared_broker(f"replaying dead letter {records[0].id} (a failed record)")
        report = ReplayReport()
        waiting: list[DeadLetter] = []
        for letter in letters:
            if letter.status != "dead" or letter.reason == MALFORMED_MESSAGE:
                report.skipped[letter.id] = self._not_replayable(letter)
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
                    report.skipped[letter.id] = _meanwhile(self.store.status_change(letter.id))
            progress(len(waiting))
        replayable = [x for x in letters if x.id not in report.skipped]
        needs_broker = [x for x in replayable if x.stage == "transform"]
        for letter in (x for x in replayable if x.stage == "ingress"):
            self._return_file(letter, reason, report)
            progress(1)
        if needs_broker:
            with open_publisher(self.broker, self.topology) as sink:
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
        # The letter stays locked until the broker confirmed the record, so of two operators replaying
        # it at once only one publishes; a failed publish leaves it dead.
        try:
            with self._replaying(letter, reason):
                sink.publish(
                    self.topology.ingress_queue(letter.route), message, headers={"replay_of": letter.id}
                )
        except DeadLetterStateError as error:
            report.skipped[letter.id] = _meanwhile(error.change)
            return
        report.replayed.append(letter.id)

    def _replaying(self, letter: DeadLetter, reason: str) -> AbstractContextManager[DeadLetter]:
        return self.store.changing_status(
            letter.id, "replayed", actor=self.actor, reason=reason, only_from=("dead",)
        )

    def _return_file(self, letter: DeadLetter, reason: str, report: ReplayReport) -> None:
        if letter.reason in _FILES_NOT_RETURNED:
            report.skipped[letter.id] = _FILES_NOT_RETURNED[letter.reason]
            return
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
        try:
            with self._replaying(letter, reason):
                shutil.move(rejected, inbox / rejected.name)
        except DeadLetterStateError as error:
            report.skipped[letter.id] = _meanwhile(error.change)
            return
        rejected.with_name(rejected.name + ".reason.txt").unlink(missing_ok=True)
        report.replayed.append(letter.id)

    def discard(self, letters: Sequence[DeadLetter], *, reason: str) -> ReplayReport:
        """Discard open letters for good; a discarded delivery letter releases the events parked behind it.

        A letter is discarded only in the status it was read in: one replayed (or released by the router)
        since is reported with who did it, not dropped behind their back.
        """
        report = ReplayReport()
        for letter in letters:
            if letter.status not in ("dead", "parked"):
                report.skipped[letter.id] = f"it is already {self.store.status_change(letter.id)}"
                continue
            try:
                self.store.set_status(
                    letter.id, "discarded", actor=self.actor, reason=reason, only_from=(letter.status,)
                )
            except DeadLetterStateError as error:
                report.skipped[letter.id] = _meanwhile(error.change)
                continue
            report.replayed.append(letter.id)
        return report

    def edit(self, letter: DeadLetter, payload: Any, *, reason: str) -> ReplayReport:
        """Validate an operator's corrected payload, store it (audited) and replay the letter.

        Raises DeadLetterStateError when another operator changed the letter since it was read.
        """
        checked = self.validate_payload(letter, payload)
        edited = self.store.update_payload(
            letter.id, checked, actor=self.actor, reason=reason, only_from=(letter.status,)
        )
        return self.replay_letters([edited], reason=reason)

    def edit_text(self, letter: DeadLetter, text: str, *, reason: str) -> ReplayReport:
        """:meth:`edit` with the payload as an operator typed it: JSON text, refused with where it breaks."""
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise ReplayError(
                f"the edited payload is not JSON (line {error.lineno}, column {error.colno}: {error.msg})"
            ) from None
        return self.edit(letter, payload, reason=reason)

    def check_editable(self, letter: DeadLetter) -> None:
        """Raise ReplayError when ``letter`` cannot be edited and replayed (its status, stage or a
        memory:// broker its record would be lost in)."""
        if letter.reason == MALFORMED_MESSAGE:
            raise ReplayError(f"dead letter {letter.id}: {self._not_replayable(letter)}")
        if letter.status != "dead":
            raise LetterNotDead(f"dead letter {letter.id}: {self._not_replayable(letter)}")
        if letter.stage == "ingress":
            raise ReplayError(
                f"dead letter {letter.id} is a rejected file ({letter.detail}); fix the file in the errors "
                "folder and replay the letter instead of editing it"
            )
        if letter.stage == "transform":
            self.require_shared_broker(f"replaying edited dead letter {letter.id} (a failed record)")

    def _not_replayable(self, letter: DeadLetter) -> str:
        if letter.reason == MALFORMED_MESSAGE:
            return (
                "it holds a queue message the router could not read, not a record: see `show`, then discard"
            )
        if letter.status == "parked":
            return "it is parked behind an earlier dead letter of its key; replay or discard that one"
        return f"it is already {self.store.status_change(letter.id)}"

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

def _meanwhile(change: StatusChange) -> str:
    """Why an action on a letter lost to another one: what was done to it since it was read, by whom."""
    done = "replayed (handed back to the router)" if change.status == "parked" else change.status
    return " ".join(part for part in ("it was", done, change.by, "meanwhile") if part)


_FILES_NOT_RETURNED: dict[str, str] = {
    Refusal.link: (
        "it is a symbolic link, never read: put the real file in the inbox, then discard the letter"
    ),
    Refusal.file_name: (
        "its name is not UTF-8: rename it in the errors folder, move it to the inbox, then discard the letter"
    ),
    Refusal.changed: (
        "part of it was published before it changed, and publishing it again would send those records under "
        "new event ids: get the missing rows as a new file, then discard the letter"
    ),
}
"""Rejected files that going back to the inbox would not fix, with what to do instead."""


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


def record_message(letter: DeadLetter) -> IngressChunk:
    """A one-record ingress message for a transform-stage letter, keeping its original event id."""
    if letter.stage != "transform":
        raise ReplayError(f"dead letter {letter.id} is a {letter.stage} letter, not a failed record")
    source = letter.source_ref or {}
    # The header the record was read under (XML ancestors, CSV preamble, fixed-width header).
    document = source.get("document")
    record = ChunkRecord(
        n=source.get("record") or 1,
        line=source.get("line"),
        data=letter.payload,
        event_id=letter.event_id or None,
        doc=None if document is None else 0,
    )
    return IngressChunk(
        route=letter.route,
        system=source.get("system") or letter.route,
        message_id=source.get("message_id") or f"deadletter-{letter.id}",
        origin={"file": source["file"]} if source.get("file") else {},
        records=[record],
        documents=UNSET if document is None else [document],
    )
