"""What every `router` subcommand shares: the `-c/--config` option, config loading, opening the store,
exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar

import click

from ops.secrets import redact
from router.config import ConfigError, RouterConfig, find_config_path, load_config
from state import StoreUnavailable

Opened = TypeVar("Opened")

EXIT_RUNTIME = 1
EXIT_CONFIG = 2

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    metavar="FILE",
    help="Route configuration (default: $ROUTER_CONFIG, then ./routes.yaml).",
)


def load_or_exit(config_path: str | None) -> RouterConfig:
    """Load the configuration or exit 2 with every problem, one `file:line:col: message` per line."""
    path = find_config_path(config_path)
    try:
        return load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            click.echo(str(problem), err=True)
        click.echo(f"{path}: {len(error.problems)} problem(s); nothing was started", err=True)
        sys.exit(EXIT_CONFIG)


@contextmanager
def store_or_exit(
    config: RouterConfig, verb: str, opener: Callable[[str], AbstractContextManager[Opened]]
) -> Iterator[Opened]:
    """The configured store, open for the block; unreachable (on opening or in the block), its error is
    printed as `router VERB: …` (redacted: it may quote the store URL) and the command exits 1."""
    try:
        with opener(config.store.resolved_url(config.base_dir)) as store:
            yield store
    except StoreUnavailable as error:
        click.echo(redact(f"router {verb}: {error}"), err=True)
        sys.exit(EXIT_RUNTIME)
