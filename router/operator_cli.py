"""What the operator's commands (`router deadletter …`, `router replay`) share: times with an offset,
``--actor`` and ``--json``, the store opened with the failures of an action turned into exit 1, and a
progress bar for long replays.

Everything printed from data goes through router.terminal, so markup or escape sequences in a payload
cannot restyle the output or take over the terminal; messages are redacted (they may quote store URLs).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.progress import Progress

from deadletter import DeadLetterStateError
from ops.secrets import redact
from router.broker import BrokerUnavailable
from router.cli_common import EXIT_RUNTIME, load_or_exit
from router.config import RouterConfig
from router.terminal import printable
from state import Store, StoreUnavailable, default_actor

PROGRESS_FROM = 20


class IsoTime(click.ParamType[datetime]):
    """An ISO 8601 time with its offset (``2026-11-24T09:00:00Z``); a time without one is refused."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 time; expected e.g. 2026-11-24T09:00:00Z", param, ctx)
        if moment.tzinfo is None:
            self.fail(f"{value!r} has no timezone; add one, e.g. {value}Z or {value}-05:00", param, ctx)
        return moment


ISO_TIME = IsoTime()
actor_option = click.option(
    "--actor", default=default_actor, show_default="$USER", help="Who is acting (audit)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print data as JSON.")


def fail(message: str, code: int) -> NoReturn:
    """Print ``message`` (redacted, printable) on stderr and exit with ``code``."""
    # Messages quote store URLs and exception text, which may hold a secret.
    click.echo(printable(redact(message), multiline=True), err=True)
    sys.exit(code)


@contextmanager
def opened(config_path: str | None) -> Iterator[tuple[RouterConfig, Store]]:
    """The configuration and its store for a command's block; an unreachable store or broker, or a
    letter changed meanwhile, exits 1."""
    config = load_or_exit(config_path)
    try:
        store = Store(config.store.resolved_url(config.base_dir))
    except StoreUnavailable as error:
        fail(f"router: {error}", EXIT_RUNTIME)
    try:
        yield config, store
    except (StoreUnavailable, BrokerUnavailable, DeadLetterStateError) as error:
        fail(f"router: {error}", EXIT_RUNTIME)
    finally:
        store.close()


@contextmanager
def progress_bar(total: int, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr for replays of many letters or events; silent for a few."""
    if quiet or total < PROGRESS_FROM:
        yield lambda _: None
        return
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("replaying", total=total)
        yield lambda done: progress.advance(task, done)
