"""What every `router` subcommand shares: the `-c/--config` option, config loading, exit codes."""

from __future__ import annotations

import sys

import click

from router.config import ConfigError, RouterConfig, find_config_path, load_config

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
