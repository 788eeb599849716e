"""`router store upgrade|current`: the state store's schema revision, and upgrading it to the newest.

Exit codes: 0 ok, 1 the store unreachable or the upgrade failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import sys

import click

from ops.secrets import redact
from router.cli_common import EXIT_RUNTIME, config_option, load_or_exit
from state import Store, StoreUnavailable
from state.engine import StoreEngine
from state.migrate import head_revision


@click.group("store")
def store_group() -> None:
    """The state store's schema (Alembic migrations shipped with the router)."""


@store_group.command()
@config_option
def upgrade(config_path: str | None) -> None:
    """Upgrade the store to the newest schema revision; prints FROM → TO."""
    config = load_or_exit(config_path)
    try:
        with Store(config.store.resolved_url(config.base_dir)) as store:
            done = store.upgrade
    except StoreUnavailable as error:
        click.echo(redact(f"router store upgrade: {error}"), err=True)
        sys.exit(EXIT_RUNTIME)
    click.echo(f"store {done}{' (already the newest)' if done.before == done.after else ''}")


@store_group.command()
@config_option
def current(config_path: str | None) -> None:
    """Print the store's schema revision and the newest this router ships, changing nothing."""
    config = load_or_exit(config_path)
    try:
        with StoreEngine(config.store.resolved_url(config.base_dir)) as store:
            revision = store.revision()
    except StoreUnavailable as error:
        click.echo(redact(f"router store current: {error}"), err=True)
        sys.exit(EXIT_RUNTIME)
    head = head_revision()
    state = "up to date" if revision == head else "run `router store upgrade`"
    click.echo(f"store at {revision or 'no revision'}; newest {head} ({state})")
