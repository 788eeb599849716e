"""`router deadletter list|show|replay|edit|discard`: the operator's side of the dead letters.

Commands stay thin: filters and output here, the work in router.replay and state. Every
action is audited with who (``--actor``, default ``$USER``), when and why. Exit codes: 0 ok, 1 runtime
failure (store or broker unreachable, a letter that could not be replayed, a letter another operator
changed meanwhile), 2 bad usage or configuration (e.g. a replay that would publish to ``memory://``).
Everything printed from data goes through router.terminal, so markup or escape sequences in a payload
cannot restyle the output or take over the terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from deadletter import STAGES, STATUSES, DeadLetter, DeadLetterStateError, DeadLetterStatus
from router.cli_common import EXIT_CONFIG, EXIT_RUNTIME, config_option
from router.operator_cli import ISO_TIME, actor_option, fail, json_option, opened, progress_bar
from router.replay import LetterNotDead, Replayer, ReplayError, ReplayReport
from router.terminal import data_text, printable
from state import Store

WIDE_TERMINAL = 120
"""Below this many columns `list` leaves the detail out rather than squeezing every column."""
DETAIL_CHARS = 80


def _filters(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--route", metavar="NAME", help="Only this route."),
            click.option("--target", metavar="NAME", help="Only this target."),
            click.option("--stage", type=click.Choice(STAGES), help="Only this stage."),
            click.option("--key", "sequence_key", metavar="KEY", help="Only this sequence key."),
            click.option("--since", type=ISO_TIME, help="Created at or after TIME (ISO 8601 with offset)."),
            click.option("--until", type=ISO_TIME, help="Created before TIME."),
        ]
    ):
        command = option(command)
    return command


def _letters(store: Store, ids: Sequence[int]) -> list[DeadLetter]:
    letters = []
    for letter_id in ids:
        letter = store.get_dead_letter(letter_id)
        if letter is None:
            fail(f"router deadletter: dead letter {letter_id} does not exist", EXIT_CONFIG)
        letters.append(letter)
    return sorted(letters, key=lambda letter: letter.id)


def _table(letters: Sequence[DeadLetter], width: int) -> Table:
    """One line per letter (kubectl-style); the detail column only where the terminal has room for it."""
    table = Table(box=None, pad_edge=False)
    headers = ["id", "created (UTC)", "route", "stage", "target", "key", "status", "reason", "tries"]
    with_detail = width >= WIDE_TERMINAL
    for header in headers:
        table.add_column(header, no_wrap=True)
    if with_detail:
        table.add_column("detail", no_wrap=True, overflow="ellipsis")
    for letter in letters:
        cells = [
            str(letter.id),
            letter.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            letter.route,
            letter.stage,
            letter.target or "-",
            letter.sequence_key or "-",
            letter.status,
            letter.reason,
            str(letter.attempts),
            *([letter.detail[:DETAIL_CHARS]] if with_detail else []),
        ]
        table.add_row(*(data_text(cell) for cell in cells))
    return table


def _report(report: ReplayReport, verb: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({verb: report.replayed, "skipped": report.skipped}, indent=2))
    else:
        if report.replayed:
            click.echo(f"{verb} {len(report.replayed)}: {', '.join(map(str, report.replayed))}")
        for letter_id, why in sorted(report.skipped.items()):
            click.echo(f"dead letter {letter_id} not {verb}: {printable(why)}", err=True)
    if report.skipped:
        sys.exit(EXIT_RUNTIME)


@click.group("deadletter")
def deadletter() -> None:
    """Inspect and resolve dead letters: list, show, replay, edit, discard."""


@deadletter.command("list")
@config_option
@_filters
@click.option("--status", type=click.Choice(STATUSES), help="Only this status.")
@click.option("--limit", default=1000, show_default=True, help="At most this many, oldest first.")
@json_option
def list_letters(
    config_path: str | None, status: DeadLetterStatus | None, limit: int, as_json: bool, **filters: Any
) -> None:
    """Dead letters, oldest first, filtered by route, target, stage, status, key and time."""
    with opened(config_path) as (_, store):
        letters = store.list_dead_letters(status=status, limit=limit, **filters)
    if as_json:
        click.echo(json.dumps([letter.to_dict() for letter in letters], indent=2, default=str))
    elif letters:
        console = Console()
        console.print(_table(letters, console.width))
        if console.width < WIDE_TERMINAL:
            console.print("[dim]router deadletter show ID for the detail of one letter[/dim]")
    else:
        click.echo("no dead letters match")


@deadletter.command()
@config_option
@click.argument("letter_id", metavar="ID", type=int)
@json_option
def show(config_path: str | None, letter_id: int, as_json: bool) -> None:
    """One dead letter: where and why it failed, its payload and its history."""
    with opened(config_path) as (_, store):
        [letter] = _letters(store, [letter_id])
        history = store.list_audit(f"deadletter:{letter_id}")
    document = {**letter.to_dict(), "history": [entry.to_dict() for entry in history]}
    if as_json:
        click.echo(json.dumps(document, indent=2, default=str))
        return
    console = Console()
    for label, value in (
        ("dead letter", f"{letter.id} ({letter.status})"),
        ("route / stage", f"{letter.route} / {letter.stage}"),
        ("target / key", f"{letter.target or '-'} / {letter.sequence_key or '-'}"),
        ("reason", f"{letter.reason} after {letter.attempts} attempt(s)"),
        (
            "created / updated",
            f"{letter.created_at:%Y-%m-%d %H:%M:%S} / {letter.updated_at:%Y-%m-%d %H:%M:%S} UTC",
        ),
        ("event id", letter.event_id or "-"),
    ):
        console.print(_labelled(label, data_text(value)))
    console.print(_labelled("detail", data_text(letter.detail, multiline=True)))
    console.print(_labelled("source", data_text(json.dumps(letter.source_ref, default=str))))
    console.print("[bold]payload[/bold]:")
    # JSON escapes C0 controls itself; ensure_ascii escapes DEL, C1 and bidi marks too.
    console.print_json(json.dumps(letter.payload, default=str), ensure_ascii=True)
    if not history:
        console.print("[bold]history[/bold]: none yet")
        return
    events = Table("when (UTC)", "actor", "action", "detail", title="history")
    for entry in history:
        events.add_row(
            entry.at.strftime("%Y-%m-%d %H:%M:%S"),
            data_text(entry.actor),
            data_text(entry.action),
            data_text(json.dumps(entry.detail, default=str)),
        )
    console.print(events)


def _labelled(label: str, value: Text) -> Text:
    return Text.assemble((label, "bold"), ": ", value)


@deadletter.command("replay")
@config_option
@click.argument("ids", nargs=-1, type=int)
@_filters
@click.option("--reason", default="replayed by an operator", show_default=True, help="Why (audit).")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed, change nothing.")
@actor_option
@json_option
def replay_letters(
    config_path: str | None,
    ids: tuple[int, ...],
    reason: str,
    dry_run: bool,
    actor: str,
    as_json: bool,
    **filters: Any,
) -> None:
    """Replay dead letters by ID, or every dead letter matching the filters.

    A delivery letter goes to its target again ahead of the events parked behind it, in order; a
    failed record goes through the transform again with its original event id; a rejected file goes
    back to the inbox.
    """
    given = {name: value for name, value in filters.items() if value is not None}
    if not ids and not given:
        fail(
            "router deadletter replay: give dead letter IDs or at least one filter (--route, --target, ...)",
            2,
        )
    with opened(config_path) as (config, store):
        if ids:
            letters = [letter for letter in _letters(store, ids) if _matches(letter, given)]
        else:
            letters = Replayer(config, store, actor).replayable(**given)
        if dry_run:
            _preview(letters, as_json)
            return
        if not letters and not as_json:
            click.echo("no dead letters match; nothing replayed")
            return
        replayer = Replayer(config, store, actor)
        try:
            with progress_bar(len(letters), as_json) as advance:
                report = replayer.replay_letters(letters, reason=reason, progress=advance)
        except ReplayError as error:
            fail(f"router deadletter replay: {error}; nothing replayed", EXIT_CONFIG)
    _report(report, "replayed", as_json)


def _matches(letter: DeadLetter, filters: dict[str, Any]) -> bool:
    since, until = filters.get("since"), filters.get("until")
    fields = {name: value for name, value in filters.items() if name not in ("since", "until")}
    return (
        all(getattr(letter, name) == value for name, value in fields.items())
        and (since is None or letter.created_at >= since)
        and (until is None or letter.created_at < until)
    )


def _preview(letters: Sequence[DeadLetter], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([letter.to_dict() for letter in letters], indent=2, default=str))
        return
    click.echo(f"would replay {len(letters)} dead letter(s)")
    if letters:
        console = Console()
        console.print(_table(letters, console.width))


@deadletter.command()
@config_option
@click.argument("letter_id", metavar="ID", type=int)
@click.option("--reason", default="payload corrected by an operator", show_default=True, help="Why (audit).")
@actor_option
def edit(config_path: str | None, letter_id: int, reason: str, actor: str) -> None:
    """Open the payload in $EDITOR; when saved and valid, store it (audited) and replay the letter."""
    with opened(config_path) as (config, store):
        [letter] = _letters(store, [letter_id])
        replayer = Replayer(config, store, actor)
        try:
            replayer.check_editable(letter)
        except LetterNotDead as error:
            fail(f"router deadletter edit: {error}", EXIT_RUNTIME)
        except ReplayError as error:
            fail(f"router deadletter edit: {error}", EXIT_CONFIG)
        original = json.dumps(letter.payload, indent=2, ensure_ascii=False, default=str) + "\n"
        edited = click.edit(original, extension=".json")
        if edited is None or edited == original:
            click.echo(f"dead letter {letter_id}: no change; nothing replayed")
            return
        try:
            report = replayer.edit_text(letter, edited, reason=reason)
        except ReplayError as error:
            fail(f"router deadletter edit: {error}; nothing changed", EXIT_CONFIG)
        except DeadLetterStateError as error:
            changed = f"dead letter {letter_id} was {error.change} meanwhile"
            fail(f"router deadletter edit: {changed}; nothing changed", EXIT_RUNTIME)
    _report(report, "replayed", as_json=False)


@deadletter.command()
@config_option
@click.argument("ids", nargs=-1, type=int, required=True)
@click.option("--reason", required=True, help="Why these letters are dropped for good (audit).")
@actor_option
@json_option
def discard(config_path: str | None, ids: tuple[int, ...], reason: str, actor: str, as_json: bool) -> None:
    """Drop dead letters for good; events parked behind a discarded delivery letter then go on."""
    with opened(config_path) as (config, store):
        report = Replayer(config, store, actor).discard(_letters(store, ids), reason=reason)
    _report(report, "discarded", as_json)


