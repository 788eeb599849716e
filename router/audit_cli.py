"""`router audit verify`: check the audit trail's hash chain and name the first broken record.

Exit codes: 0 intact, 1 broken (or the store unreachable), 2 bad usage or configuration.
"""

from __future__ import annotations

import json
import sys

import click

from router.cli_common import EXIT_RUNTIME, config_option, load_or_exit, store_or_exit
from state import Store
from state.audit_verify import ChainReport


@click.group()
def audit() -> None:
    """The audit trail of operator and system actions."""


@audit.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(config_path: str | None, as_json: bool) -> None:
    """Check that no audit record was changed, deleted, inserted or reordered (exit 1 if one was)."""
    with store_or_exit(load_or_exit(config_path), "audit verify", Store) as store:
        report = store.verify_audit()
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else _describe(report))
    if not report.intact:
        sys.exit(EXIT_RUNTIME)


def _describe(report: ChainReport) -> str:
    """One paragraph for an operator: intact with the head to note down, or the first broken record."""
    if report.broken is None:
        return f"audit trail intact: {report.records} record(s), head {report.head_hash}"
    broken = report.broken
    record = broken.record
    where = (
        f"record #{record.id} ({record.at.isoformat()}, actor {record.actor}, action {record.action})"
        if record is not None
        else "the end of the trail"
    )
    return (
        f"audit trail BROKEN at {where}: {broken.kind.value}: {broken.message}\n"
        f"{report.records} record(s) checked"
    )
