"""`router replay`: re-send delivered history to a target restored from a backup.

The work is router.history_replay's; options, output and exit codes here (0 ok, 1 store or broker
unreachable, 2 bad usage: an unknown target, a replay that would publish to ``memory://``).
"""

from __future__ import annotations

import json
from datetime import datetime

import click

from router.cli_common import EXIT_CONFIG, config_option
from router.history_replay import HistoryReplayer
from router.operator_cli import ISO_TIME, actor_option, fail, json_option, opened, progress_bar
from router.replay import ReplayError


@click.command("replay")
@config_option
@click.option("--target", required=True, metavar="NAME", help="The restored target to send history to.")
@click.option(
    "--since", required=True, type=ISO_TIME, help="Events delivered at or after TIME (with offset)."
)
@click.option("--until", type=ISO_TIME, help="Events delivered before TIME.")
@click.option("--key", "sequence_key", metavar="KEY", help="Only this sequence key.")
@click.option("--dry-run", is_flag=True, help="Count what would be re-sent, send nothing.")
@actor_option
@json_option
def replay_history(
    config_path: str | None,
    target: str,
    since: datetime,
    until: datetime | None,
    sequence_key: str | None,
    dry_run: bool,
    actor: str,
    as_json: bool,
) -> None:
    """Re-send delivered history to a target restored from a backup: in order, same event ids."""
    with opened(config_path) as (config, store):
        replayer = HistoryReplayer(config, store, actor)
        try:
            if dry_run:
                count = len(replayer.history(target, since=since, until=until, sequence_key=sequence_key))
            else:
                count = replayer.replay_history(
                    target,
                    since=since,
                    until=until,
                    sequence_key=sequence_key,
                    progress_for=lambda total: progress_bar(total, as_json),
                )
        except ReplayError as error:
            fail(f"router replay: {error}", EXIT_CONFIG)
    verb = "would re-send" if dry_run else "re-sent"
    if as_json:
        click.echo(json.dumps({"target": target, "dry_run": dry_run, "events": count}))
    else:
        click.echo(f"{verb} {count} event(s) to {target}")
