"""`router store upgrade|current`: the state store's schema revision, and upgrading it to the newest.

Exit codes: 0 ok, 1 the store unreachable or the upgrade failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import click

from router.cli_common import config_option, load_or_exit, store_or_exit
from state import Store
from state.engine import StoreEngine
from state.migrate import head_revision


@click.group("store")
def store_group() -> None:
    """The state store's schema (Alembic migrations shipped with the router)."""


@store_group.command()
@config_option
def upgrade(config_path: str | None) -> None:
    """Upgrade the store to the newest schema revision; prints FROM → TO."""
    with store_or_exit(load_or_exit(config_path), "store upgrade", Store) as store:
        done = store.upgrade
    click.echo(f"store {done}{' (already the newest)' if done.before == done.after else ''}")


@store_group.command()
@config_option
def current(config_path: str | None) -> None:
    """Print the store's schema revision and the newest this router ships, changing nothing."""
    with store_or_exit(load_or_exit(config_path), "store current", StoreEngine) as engine:
        revision = engine.revision()
    head = head_revision()
    state = "up to date" if revision == head else "run `router store upgrade`"
    click.echo(f"store at {revision or 'no revision'}; newest {head} ({state})")
